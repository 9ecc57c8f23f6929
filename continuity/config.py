"""The service's one TOML config file: typed, validated on load, overridable with `--set`.

A config file has eight sections: [stream], [model], [learner], [replay], [ewc],
[probe], [checkpoints], [service]. They map onto the typed configs the libraries already
validate (`learner.ModelConfig`, `LearnerConfig`, `ReplayConfig`, `EWCConfig`,
`continuity.probe.ProbeConfig`, `continuity.guard.GuardConfig`) plus three defined here
(`StreamConfig`, `CheckpointsConfig`, `ServiceConfig`). [probe] holds both ProbeConfig's
keys (what is held out) and GuardConfig's (how candidates are judged): for a user they
are one thing, the continuity probe.

Loading is strict, because a typo that is silently ignored is a service that runs with a
setting nobody chose: an unknown section or key, a value of the wrong type, a value out
of range, a bad TOML file or a missing one is a `ConfigError` whose one-line message
names the key, what was expected and what was received. The CLI prints it alone and
exits with status 2.

Secrets (Kafka SASL/SSL passwords, the admin token) come from the environment only:
`<name>_env = "VAR"` in the file means "read <name> from environment variable VAR". A
secret given as a value, in the file (readable by whoever reads the file) or by `--set`
(visible in the process list), is a ConfigError naming the `_env` form. A secret's value
never appears in an error message, a repr or `Config.to_toml()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from continuity.errors import UsageError
from continuity.probe import ProbeConfig
from continuity.stream.codecs import CODECS, DTYPE_CODES, FeatureSpec
from continuity.stream.kafka import KAFKA_SESSION_TIMEOUT_MS, SECURITY_OPTIONS, KafkaSettings, redact
from continuity.stream.sources import LOST_POSITION_ACTIONS

if TYPE_CHECKING:
    from continuity.guard import GuardConfig
    from continuity.learner.config import LearnerConfig, ModelConfig


@functools.cache
def _jax_configs() -> SimpleNamespace:
    """The typed configs whose modules import JAX, imported on first use.

    Command modules call `add_config_arguments` while the parser is built, and building
    it (`continuity --help`) must not pay the seconds a JAX import costs.
    """
    from continuity.guard import GuardConfig
    from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig

    return SimpleNamespace(
        GuardConfig=GuardConfig,
        LearnerConfig=LearnerConfig,
        ModelConfig=ModelConfig,
        ReplayConfig=ReplayConfig,
        EWCConfig=EWCConfig,
    )


SOURCES = ("kafka", "file")
DEAD_LETTER_SINKS = ("file", "topic")
OFFSET_RESETS = ("earliest", "latest")
WIRE_DTYPES = tuple(DTYPE_CODES.values())
ENV_SUFFIX = "_env"  # `<name>_env = "VAR"`: the value of <name> is read from environment variable VAR

# Security options that are Python objects (an SSLContext, a token provider): a text file cannot give them.
_OBJECT_SECURITY_OPTIONS = frozenset({"ssl_context", "sasl_oauth_token_provider"})
_BOOL_SECURITY_OPTIONS = frozenset({"ssl_check_hostname"})
# Which security options are secrets: exactly those stream.kafka redacts in its own logs.
SECRET_SECURITY_OPTIONS = frozenset(k for k in SECURITY_OPTIONS if redact({k: ""})[k] == "***")
REDACTED = "***"


class ConfigError(UsageError):
    """The config file or a `--set` override is invalid; the one-line message names the key."""


# ---- the configs defined here ------------------------------------------------------------------


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _one_of(name: str, value, allowed: tuple) -> None:
    choices = ", ".join(repr(a) for a in allowed)
    _require(value in allowed, f"`{name}` must be one of {choices}. Got {value!r}.")


class _Keep(enum.Enum):
    """A sentinel of its own type, so `group: str | None` can still say "not given"."""

    GROUP = enum.auto()  # kafka_settings(group=...) not given: use StreamConfig.group


@dataclass(frozen=True)
class StreamConfig:
    """Where records come from and what a valid example looks like.

    `dead_letter_path` and `quarantine_path` are relative to the checkpoint directory
    (see `Config.dead_letter_file`), so one run's artefacts stay together.
    """

    source: str = "kafka"  # "kafka", or "file": a recorded Parquet stream (`continuity replay`)
    bootstrap: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("digits",)
    group: str | None = "continuity"  # None or "": explicit assignment of every partition, no group
    codec: str = "binary"
    feature_shape: tuple[int, ...] = (8, 8, 1)
    dtype: str = "float32"
    num_classes: int | None = 10  # None: labels without classes (learner.task = "regression": float targets)
    auto_offset_reset: str = "earliest"
    # A checkpointed position the broker no longer has (topic recreated, log lost or truncated):
    # "halt" (exit status 4, an operator decides), "earliest" or "latest" (see README).
    on_lost_positions: str = "halt"
    # Kafka's own default. The embedded broker holds a group join for about half of it, so the
    # demo and the tests use its short one (stream.broker.SHORT_SESSION_TIMEOUT_MS).
    session_timeout_ms: int = KAFKA_SESSION_TIMEOUT_MS
    dead_letters: str = "file"  # "file": dead_letter_path (JSON lines); "topic": <topic>.dlq
    dead_letter_path: str = "dead-letters.jsonl"
    quarantine_path: str = "quarantine.jsonl"
    security: dict = field(default_factory=dict, repr=False)  # kafka-python SASL/SSL options; may hold secrets
    # [stream.fields]: the feature spec of named-field JSON events (codec "fields"), as its
    # plain table (stream.fields.FieldSpec.to_dict); {}: none.
    fields: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "topics", (self.topics,) if isinstance(self.topics, str) else tuple(self.topics))
        object.__setattr__(self, "feature_shape", tuple(self.feature_shape))
        object.__setattr__(self, "security", dict(self.security))
        if self.group == "":
            object.__setattr__(self, "group", None)
        _one_of("stream.source", self.source, SOURCES)
        _require(
            isinstance(self.bootstrap, str) and bool(self.bootstrap.strip()),
            f"`stream.bootstrap` must be 'host:port' (comma-separated for several). Got {self.bootstrap!r}.",
        )
        _require(
            len(self.topics) > 0 and all(isinstance(t, str) and t for t in self.topics),
            f"`stream.topics` must be a non-empty list of topic names. Got {list(self.topics)!r}.",
        )
        _one_of("stream.codec", self.codec, CODECS)
        _require(
            0 < len(self.feature_shape) <= 8 and all(isinstance(d, int) and d > 0 for d in self.feature_shape),
            f"`stream.feature_shape` must be a list of 1 to 8 positive integers. Got {list(self.feature_shape)!r}.",
        )
        _one_of("stream.dtype", self.dtype, WIRE_DTYPES)
        _require(
            self.num_classes is None or self.num_classes >= 1,
            f"`stream.num_classes` must be >= 1, or left out for a task without classes. Got {self.num_classes!r}.",
        )
        _one_of("stream.auto_offset_reset", self.auto_offset_reset, OFFSET_RESETS)
        _one_of("stream.on_lost_positions", self.on_lost_positions, LOST_POSITION_ACTIONS)
        _require(
            self.session_timeout_ms >= 1000,
            f"`stream.session_timeout_ms` must be >= 1000. Got {self.session_timeout_ms!r}.",
        )
        _one_of("stream.dead_letters", self.dead_letters, DEAD_LETTER_SINKS)
        _require(bool(self.dead_letter_path), "`stream.dead_letter_path` must be a file path. Got ''.")
        _require(bool(self.quarantine_path), "`stream.quarantine_path` must be a file path. Got ''.")
        unknown = sorted(set(self.security) - SECURITY_OPTIONS)
        _require(
            not unknown, f"`stream.security` has unknown option(s) {unknown}; allowed: {sorted(SECURITY_OPTIONS)}."
        )
        self._check_fields()

    # -- [stream.fields] (feature spec of the "fields" codec)
    def _check_fields(self) -> None:
        _require(
            (self.codec == "fields") == bool(self.fields),
            '`stream.codec` must be "fields" when a [stream.fields] table describes the events, and only then. '
            f"Got {self.codec!r} with {'a' if self.fields else 'no'} [stream.fields] table.",
        )
        spec = self.field_spec()
        if spec is not None and spec.label_classes is not None:
            _require(
                self.num_classes == len(spec.label_classes),
                f"`stream.num_classes` must be {len(spec.label_classes)}, the labels [stream.fields] label_classes "
                f"lists. Got {self.num_classes!r}.",
            )

    def field_spec(self):
        """The stream.fields.FieldSpec of [stream.fields], or None without one."""
        from continuity.stream.fields import FieldSpec

        return FieldSpec.from_dict(self.fields) if self.fields else None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "security"
        )
        return f"StreamConfig({fields}, security={redact(self.security)!r})"

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(shape=self.feature_shape, dtype=self.dtype, num_classes=self.num_classes)

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


@dataclass(frozen=True)
class CheckpointsConfig:
    """Where checkpoints (and the ledger inside the store) live, and how many ordinary ones are kept."""

    dir: str = "runs/continuity"
    keep_last: int = 3
    # Every window is judged; this only bounds how much a crash re-trains. Saving every
    # window of a fast stream would spend the service's time writing checkpoints.
    every_seconds: float = 10.0
    # A failing save (a full disk) never stops training; this bounds how long the service
    # trains on without a checkpoint before it stops (exit status 5) for an operator.
    max_unsaved_seconds: float = 3600.0

    def __post_init__(self):
        _require(bool(self.dir), "`checkpoints.dir` must be a directory path. Got ''.")
        _require(
            self.max_unsaved_seconds >= 0,
            f"`checkpoints.max_unsaved_seconds` must be >= 0 (0 = never stop). Got {self.max_unsaved_seconds!r}.",
        )
        _require(self.keep_last >= 1, f"`checkpoints.keep_last` must be >= 1. Got {self.keep_last!r}.")
        _require(self.every_seconds >= 0, f"`checkpoints.every_seconds` must be >= 0. Got {self.every_seconds!r}.")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class ServiceConfig:
    """The running service: HTTP endpoints, progress reports, shutdown, seed."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080  # 0: pick a free port (tests)
    admin_token: str | None = field(default=None, repr=False)  # bearer token for /admin/*; a secret
    progress_every_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.admin_token == "":
            object.__setattr__(self, "admin_token", None)
        _require(bool(self.http_host), "`service.http_host` must be a host or address. Got ''.")
        _require(0 <= self.http_port <= 65535, f"`service.http_port` must be in 0..65535. Got {self.http_port!r}.")
        _require(self.progress_every_s > 0, f"`service.progress_every_s` must be > 0. Got {self.progress_every_s!r}.")
        _require(
            self.shutdown_timeout_s > 0, f"`service.shutdown_timeout_s` must be > 0. Got {self.shutdown_timeout_s!r}."
        )
        _require(0 <= self.seed < 2**32, f"`service.seed` must be in 0..2**32-1. Got {self.seed!r}.")
        # The admin endpoints roll the model back: anyone who can reach them controls the service.
        _require(
            self.admin_token is not None or is_loopback(self.http_host),
            f"`service.http_host` refusing to expose admin endpoints on {self.http_host} without "
            'service.admin_token (set admin_token_env = "VAR" in [service], or bind 127.0.0.1).',
        )


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration; `load_config` builds it, `Config()` is the defaults."""

    stream: StreamConfig = field(default_factory=StreamConfig)
    learner: LearnerConfig = field(default_factory=lambda: _service_learner())  # [model] [learner] [replay] [ewc]
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # [probe]: what is held out
    guard: GuardConfig = field(
        default_factory=lambda: _jax_configs().GuardConfig()
    )  # [probe]: how candidates are judged
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    source_path: str | None = field(default=None, compare=False)  # the file it came from

    def __post_init__(self):
        from continuity.factory import build_task

        build_task(self.learner, self.stream.num_classes)  # the stream's labels are what the task learns from

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
        """{section: {key: value}} as in the file (unset optional values None; secrets '***' unless redact=False)."""
        out: dict = {}
        for section in SECTIONS:
            values: dict[str, Any] = {}
            for spec in _specs()[section].values():
                value = getattr(_section_object(self, spec), spec.name)
                if spec.kind == "table":
                    if value:
                        values[spec.name] = value
                    continue
                if spec.kind == "security":
                    security = {
                        k: (REDACTED if redact and (k in SECRET_SECURITY_OPTIONS) else v) for k, v in value.items()
                    }
                    if security:
                        values["security"] = security
                    continue
                if isinstance(value, tuple):
                    value = list(value)
                values[spec.name] = REDACTED if (redact and spec.secret and value is not None) else value
            out[section] = values
        return out

    def to_toml(self, *, redact: bool = True) -> str:
        """The resolved config as TOML that `load_config` reads back; secrets shown as '***'.

        A config with secrets reads back only once they are given as `<key>_env` again.
        """
        lines = []
        if self.source_path:
            lines.append(f"# resolved from {self.source_path}")
        lines.append(f"# digest {self.digest()}")
        data = self.to_dict(redact=redact)
        for section in SECTIONS:
            lines.append("")
            lines.append(f"[{section}]")
            security = data[section].pop("security", None)
            fields = data[section].pop("fields", None)
            for key, value in data[section].items():
                # An optional string left unset reads back from "" (the file's way to say none).
                lines.append(f"{key} = {_toml_value('' if value is None else value)}")
            if security:
                lines.append("")
                lines.append(f"[{section}.security]")
                lines.extend(f"{key} = {_toml_value(value)}" for key, value in security.items())
            if fields:
                lines.extend(_fields_toml(fields))
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        """A short digest of what decides the training result (16 hex digits).

        Paths, addresses, ports, timeouts and secrets are left out, so replaying the same
        stream into another directory, or serving it from another broker, gives the same
        digest (and, with it, bit-identical checkpoint metadata).
        """
        training: dict[str, Any] = {
            "stream": {
                "codec": self.stream.codec,
                "feature_shape": list(self.stream.feature_shape),
                "dtype": self.stream.dtype,
                "num_classes": self.stream.num_classes,
            },
            "learner": dataclasses.asdict(self.learner),
            "probe": dataclasses.asdict(self.probe),
            "guard": dataclasses.asdict(self.guard),
            "seed": self.service.seed,
        }
        if self.stream.fields:  # only then, so configs without a spec keep their digests
            training["stream"]["fields"] = self.stream.fields
        text = json.dumps(training, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- the file's schema, derived from the dataclasses -------------------------------------------

SECTIONS = ("stream", "model", "learner", "replay", "ewc", "probe", "checkpoints", "service")


@functools.cache
def _section_classes() -> dict[str, tuple[type, ...]]:
    """Which dataclass(es) each section fills. [learner] gets LearnerConfig's own scalars; its
    nested model/replay/ewc come from their own sections."""
    lib = _jax_configs()
    return {
        "stream": (StreamConfig,),
        "model": (lib.ModelConfig,),
        "learner": (lib.LearnerConfig,),
        "replay": (lib.ReplayConfig,),
        "ewc": (lib.EWCConfig,),
        "probe": (ProbeConfig, lib.GuardConfig),
        "checkpoints": (CheckpointsConfig,),
        "service": (ServiceConfig,),
    }


# Where the service's defaults differ from the learner library's neutral ones (which leave
# replay and EWC off): the settings the guard was measured with (BENCHMARKS.md, "Guard").
SERVICE_DEFAULTS = {
    ("replay", "capacity"): 1000,
    ("replay", "batch_size"): 32,
    ("ewc", "enabled"): True,
    ("ewc", "strength"): 100.0,
    ("ewc", "strength_min"): 10.0,
}


def _service_learner():
    lib = _jax_configs()
    table = {section: {k: v for (s, k), v in SERVICE_DEFAULTS.items() if s == section} for section in ("replay", "ewc")}
    return lib.LearnerConfig(replay=lib.ReplayConfig(**table["replay"]), ewc=lib.EWCConfig(**table["ewc"]))


_SECRET_KEYS = {("service", "admin_token")}
_TABLE_KEYS = {("stream", "fields")}  # a table of its own, validated by its module (stream.fields)
_ENV_KEYS = {("service", "admin_token")}  # keys (besides [stream.security]'s) that may be given as <key>_env


@dataclass(frozen=True)
class _KeySpec:
    section: str
    name: str
    owner: type
    kind: str  # bool, int, float, str, ints, strs, security
    optional: bool  # None allowed (given as "" or left out)
    default: object
    secret: bool


def _kind_of(hint) -> tuple[str, bool]:
    """(kind, optional) for a dataclass field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if hint in (bool, int, float, str):
        return hint.__name__, optional
    origin = typing.get_origin(hint)
    if origin is tuple and args and args[0] in (int, str):
        return ("ints" if args[0] is int else "strs"), optional
    if hint is dict or origin is dict:
        return "security", optional
    raise TypeError(f"config schema: unsupported field type {hint!r}")  # a programming error, not a user's


@functools.cache
def _specs() -> dict[str, dict[str, _KeySpec]]:
    """{section: {key: spec}}, from the dataclasses' fields and type hints, in field order."""
    LearnerConfig = _jax_configs().LearnerConfig  # noqa: N806 - a class
    nested = {
        f.name
        for f in dataclasses.fields(LearnerConfig)
        if dataclasses.is_dataclass(typing.get_type_hints(LearnerConfig)[f.name])
    }
    specs: dict[str, dict[str, _KeySpec]] = {}
    for section, classes in _section_classes().items():
        specs[section] = {}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if cls is LearnerConfig and f.name in nested:
                    continue
                kind, optional = ("table", False) if (section, f.name) in _TABLE_KEYS else _kind_of(hints[f.name])
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:  # a section is built from whatever its table leaves out
                    raise TypeError(f"config field {cls.__name__}.{f.name} needs a default")
                default = SERVICE_DEFAULTS.get((section, f.name), default)
                specs[section][f.name] = _KeySpec(
                    section, f.name, cls, kind, optional, default, (section, f.name) in _SECRET_KEYS
                )
    return specs


def _section_object(config: Config, spec: _KeySpec):
    """The dataclass instance inside `config` that holds `spec`'s field."""
    return {
        "stream": config.stream,
        "model": config.learner.model,
        "learner": config.learner,
        "replay": config.learner.replay,
        "ewc": config.learner.ewc,
        "probe": config.probe if spec.owner is ProbeConfig else config.guard,
        "checkpoints": config.checkpoints,
        "service": config.service,
    }[spec.section]


# ---- loading ------------------------------------------------------------------------------------


def _type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _received(value, secret: bool) -> str:
    """How an error shows what it got: the value and its type, or only the type for a secret."""
    if secret:
        return _type_name(value)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({_type_name(value)})"


_EXPECTED = {
    "bool": "a boolean (true or false)",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "ints": "an array of integers",
    "strs": "an array of strings",
}


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _coerce(kind: str, value, optional: bool):
    """The value as the dataclass field wants it, or _Mismatch naming what was expected."""
    if optional and kind in ("int", "float") and value == "" and isinstance(value, str):
        return None  # how to_toml writes an unset optional number
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _Mismatch("a finite number")
        return float(value)  # TOML's `1` where a float is expected is fine
    if kind == "str" and isinstance(value, str):
        return (value or None) if optional else value
    if (
        kind == "ints"
        and isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    if kind == "strs":
        if isinstance(value, str):  # `--set stream.topics=digits` means one topic
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    expected = _EXPECTED[kind]
    if optional and kind in ("str", "int", "float"):
        expected += ' ("" for none)'
    raise _Mismatch(expected)


def _suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Loader:
    """One load: the raw tables, where each value came from, and the error messages' wording."""

    def __init__(self, path: Path | None, environ: Mapping[str, str]):
        self.path = path
        self.environ = environ
        self.overridden: set[tuple[str, str]] = set()  # (section, key); security keys as ("stream.security", key)
        self.prefix = f"config {path}" if path is not None else "config"

    def where(self, section: str, key: str | None = None) -> str:
        label = f"[{section}]" if key is None else f"[{section}] {key}"
        if key is not None and (section, key) in self.overridden:
            label += " (from --set)"
        return f"{self.prefix}: {label}"

    def error(self, section: str, key: str | None, detail: str) -> ConfigError:
        return ConfigError(f"{self.where(section, key)}: {detail}")

    # -- reading
    def read(self) -> dict:
        if self.path is None:
            return {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return self._fail("no such file")
        except IsADirectoryError:
            return self._fail("is a directory, expected a TOML file")
        except OSError as error:
            return self._fail(f"cannot read: {error.strerror or error}")
        try:
            return tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            return self._fail(f"not UTF-8 text (byte {error.start})")
        except tomllib.TOMLDecodeError as error:
            return self._fail(f"invalid TOML: {_one_line(str(error))}")

    def _fail(self, detail: str):
        raise ConfigError(f"{self.prefix}: {detail}")

    def check_sections(self, raw: dict) -> None:
        for section, table in raw.items():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{self.prefix}: [{section}]: unknown section; expected one of: "
                    f"{', '.join(SECTIONS)}{_suggest(section, SECTIONS)}"
                )
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{self.prefix}: {section}: expected a [{section}] table, got {_received(table, True)}"
                )

    # -- overrides
    def apply(self, raw: dict, overrides: Sequence[str]) -> None:
        for item in overrides:
            key_path, sep, text = item.partition("=")
            parts = key_path.strip().split(".")
            if not sep or not all(parts) or len(parts) not in (2, 3):
                raise ConfigError(
                    f"--set {_one_line(key_path)}: expected SECTION.KEY=VALUE (e.g. learner.batch_size=64)"
                )
            section, key = parts[0], parts[1]
            if section not in _specs():
                raise ConfigError(
                    f"--set {key_path}: [{section}]: unknown section; expected one of: "
                    f"{', '.join(SECTIONS)}{_suggest(section, SECTIONS)}"
                )
            value = _parse_value(text)
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{self.prefix}: {section}: expected a [{section}] table")
            if len(parts) == 3:
                if (section, key) != ("stream", "security"):
                    raise ConfigError(f"--set {key_path}: only stream.security.OPTION has three parts")
                table = table.setdefault("security", {})
                if not isinstance(table, dict):
                    raise self.error("stream", "security", "expected a [stream.security] table")
                section, key = "stream.security", parts[2]
            elif key not in self._allowed(section):
                allowed = self._allowed(section)
                raise ConfigError(
                    f"--set {key_path}: [{section}] {key}: unknown key; expected one of: "
                    f"{', '.join(allowed)}{_suggest(key, allowed)}"
                )
            # A value replaces its environment indirection, and the other way round.
            other = key[: -len(ENV_SUFFIX)] if key.endswith(ENV_SUFFIX) else key + ENV_SUFFIX
            table.pop(other, None)
            table[key] = value
            self.overridden.add((section, key))

    @staticmethod
    def _allowed(section: str) -> list[str]:
        keys = list(_specs()[section])
        keys += [key + ENV_SUFFIX for (s, key) in sorted(_ENV_KEYS) if s == section]
        return keys

    # -- one section
    def values(self, section: str, table: dict) -> dict[type, dict]:
        """{owner class: {field: value}} for one section, every value type-checked."""
        specs = _specs()[section]
        allowed = self._allowed(section)
        out: dict[type, dict] = {cls: {} for cls in _section_classes()[section]}
        for (default_section, key), default in SERVICE_DEFAULTS.items():
            if default_section == section:
                out[specs[key].owner][key] = default
        for key in table:
            if key not in allowed:
                raise self.error(
                    section, key, f"unknown key; expected one of: {', '.join(allowed)}{_suggest(key, allowed)}"
                )
        for key, value in table.items():
            if key.endswith(ENV_SUFFIX) and key not in specs:
                name = key[: -len(ENV_SUFFIX)]
                if name in table:
                    raise self.error(section, key, f"give either {name} or {key}, not both")
                value = self.from_env(section, key, value)
                key = name
            elif specs[key].secret and value != "":  # "" is how a file says none
                raise self.secret_given(section, key)
            spec = specs[key]
            if spec.kind == "security":
                value = self.security(value)
            elif spec.kind == "table":
                value = self.fields(value)
            else:
                try:
                    value = _coerce(spec.kind, value, spec.optional)
                except _Mismatch as mismatch:
                    raise self.error(
                        section, key, f"expected {mismatch.expected}, got {_received(value, spec.secret)}"
                    ) from None
            out[spec.owner][key] = value
        return out

    def secret_given(self, section: str, key: str) -> ConfigError:
        what = "password" if "password" in key else "token"
        return self.error(
            section,
            key,
            f"a secret is read from the environment only (a file or the command line shows it to others): "
            f'give {key}{ENV_SUFFIX} = "VAR" and put the {what} in $VAR',
        )

    def from_env(self, section: str, key: str, variable) -> str:
        if not isinstance(variable, str) or not variable:
            raise self.error(
                section, key, f"expected the name of an environment variable, got {_received(variable, False)}"
            )
        value = self.environ.get(variable)
        if not value:
            state = "is empty" if value == "" else "is not set"
            raise self.error(section, key, f"environment variable {variable} {state}")
        return value

    def security(self, table) -> dict:
        section = "stream.security"
        if not isinstance(table, dict):
            raise self.error("stream", "security", f"expected a [stream.security] table, got {_received(table, True)}")
        options = sorted(SECURITY_OPTIONS - _OBJECT_SECURITY_OPTIONS)
        allowed = options + [o + ENV_SUFFIX for o in options]
        out = {}
        for key, value in table.items():
            if key not in allowed:
                hint = " (a Python object: it cannot be given in a file)" if key in _OBJECT_SECURITY_OPTIONS else ""
                raise self.error(
                    section,
                    key,
                    f"unknown security option{hint}; expected one of: "
                    f'{", ".join(options)} (or <option>{ENV_SUFFIX} = "VAR"){_suggest(key, allowed)}',
                )
            name = key
            if key.endswith(ENV_SUFFIX):
                name = key[: -len(ENV_SUFFIX)]
                if name in table:
                    raise self.error(section, key, f"give either {name} or {key}, not both")
                value = self.from_env(section, key, value)
                if name in _BOOL_SECURITY_OPTIONS:
                    lowered = value.strip().lower()
                    if lowered not in ("true", "false"):
                        raise self.error(
                            section, key, f"expected true or false in the environment variable, got {value!r}"
                        )
                    value = lowered == "true"
            elif key in SECRET_SECURITY_OPTIONS:
                raise self.secret_given(section, key)
            expected = "bool" if name in _BOOL_SECURITY_OPTIONS else "str"
            try:
                value = _coerce(expected, value, False)
            except _Mismatch as mismatch:
                raise self.error(
                    section,
                    key,
                    f"expected {mismatch.expected}, got {_received(value, name in SECRET_SECURITY_OPTIONS)}",
                ) from None
            out[name] = value
        return out

    def fields(self, table) -> dict:
        """[stream.fields] as its module reads it (normalised), or a ConfigError naming the field."""
        from continuity.stream.fields import FieldSpec

        try:
            return FieldSpec.from_dict(table).to_dict()
        except ValueError as error:
            raise self.error("stream.fields", None, _one_line(str(error))) from None

    # -- building
    def build(self, cls: type, kwargs: dict, section: str):
        try:
            return cls(**kwargs)
        except ValueError as error:
            raise self.wrap(error, section) from None

    def wrap(self, error: ValueError, section: str) -> ConfigError:
        """A dataclass's own validation error, as a ConfigError naming the key it names."""
        message = _one_line(str(error))
        named = re.match(r"`(\w+)\.(\w+)` ", message)
        if named and named.group(2) in _specs().get(named.group(1), {}):
            return self.error(named.group(1), named.group(2), message[named.end() :])
        named = re.match(r"`(\w+)` ", message)
        if named and named.group(1) in _specs():
            return self.error(named.group(1), None, message[named.end() :])
        return self.error(section, None, message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_value(text: str):
    """A `--set` value: a TOML value if it parses as one (1, 0.5, true, [1, 2], "x"), else the text itself."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text.strip()
    if set(parsed) != {"value"}:  # `1\nother = 2`: not one value
        return text.strip()
    return parsed["value"]


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, environ: Mapping[str, str] = os.environ
) -> Config:
    """Read, override, type-check and validate a config; path None -> the defaults (plus overrides).

    Raises ConfigError (a UsageError: one line, exit status 2) naming the key, what was
    expected and what was received; never with a secret's value in it.
    """
    loader = _Loader(Path(path) if path is not None else None, environ)
    raw = loader.read()
    loader.check_sections(raw)  # a bad file fails before the typed configs' (JAX) import
    lib = _jax_configs()
    loader.apply(raw, overrides or ())
    values: dict[type, dict] = {}
    for section in SECTIONS:
        values.update(loader.values(section, raw.get(section, {})))

    model = loader.build(lib.ModelConfig, values[lib.ModelConfig], "model")
    replay = loader.build(lib.ReplayConfig, values[lib.ReplayConfig], "replay")
    ewc = loader.build(lib.EWCConfig, values[lib.EWCConfig], "ewc")
    learner = loader.build(
        lib.LearnerConfig, {**values[lib.LearnerConfig], "model": model, "replay": replay, "ewc": ewc}, "learner"
    )
    stream_values = values[StreamConfig]
    from continuity.factory import TASKS

    if not TASKS[learner.task].classes and "num_classes" not in raw.get("stream", {}):
        stream_values = {**stream_values, "num_classes": None}  # a task without classes: none to count
    sections = dict(
        stream=loader.build(StreamConfig, stream_values, "stream"),
        learner=learner,
        probe=loader.build(ProbeConfig, values[ProbeConfig], "probe"),
        guard=loader.build(lib.GuardConfig, values[lib.GuardConfig], "probe"),
        checkpoints=loader.build(CheckpointsConfig, values[CheckpointsConfig], "checkpoints"),
        service=loader.build(ServiceConfig, values[ServiceConfig], "service"),
    )
    try:
        return Config(**sections, source_path=str(path) if path is not None else None)
    except ValueError as error:  # Config's own check (build_task): the stream's labels vs the learner's task
        raise loader.wrap(error, "stream") from None


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


# One line per key for `continuity config example`. A key without one is a KeyError there, so a
# field added to a config dataclass fails the example tests until it is documented here.
_SECTION_NOTES = {
    "stream": "Where records come from, and what a valid example looks like.",
    "model": "The network: an MLP or a small CNN mapping an example to class logits (regression: one number).",
    "learner": "The task, the optimizer and the micro-batch of fresh examples per step.",
    "replay": "Rehearsal: stored examples mixed into every step (capacity 0 turns it off).",
    "ewc": "Online EWC (Schwarz et al. 2018): holds important weights near the last good model,\n"
    "# with a strength lambda that decays on accepted windows and is boosted on regressions.",
    "probe": "The continuity probe: held-out examples (never trained on), and how every candidate\n"
    "# model is judged against the last good one.",
    "checkpoints": "The Orbax checkpoint store (the ledger of decisions lives inside it).",
    "service": "The running service: HTTP endpoints (/healthz, /readyz, /metrics, /status, /admin/*).",
}
_COMMENTS = {
    ("stream", "source"): '"kafka", or "file" for a recorded Parquet stream (`continuity replay FILE`)',
    ("stream", "bootstrap"): "host:port[,host:port]; `continuity broker --port 9092` runs the embedded broker",
    ("stream", "topics"): "`continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario permuted-digits`",
    (
        "stream",
        "group",
    ): 'consumer group: offsets are committed after each checkpoint; "" = no group, read every partition',
    ("stream", "codec"): '"binary", "json" or "fields" (named-field events, [stream.fields]; see README)',
    ("stream", "feature_shape"): "one example's features",
    ("stream", "dtype"): "wire dtype of the features: " + ", ".join(f'"{d}"' for d in WIRE_DTYPES),
    ("stream", "num_classes"): 'labels are integers in [0, num_classes); leave it out for learner.task = "regression"',
    ("stream", "auto_offset_reset"): 'where a partition without a checkpointed position starts: "earliest" or "latest"',
    ("stream", "on_lost_positions"): "a checkpointed position the broker no longer has (topic recreated, log lost): "
    '"halt" (exit 4, an operator decides), "earliest" (records may be trained twice) or "latest" (records in '
    "between are never trained)",
    (
        "stream",
        "session_timeout_ms",
    ): "Kafka's default; the embedded broker holds a group join ~half of it: use 6000 there",
    ("stream", "dead_letters"): 'undecodable records go to "file" (dead_letter_path) or "topic" (<topic>.dlq)',
    ("stream", "dead_letter_path"): "JSON lines; a relative path is relative to checkpoints.dir",
    ("stream", "quarantine_path"): "records of quarantined windows, JSON lines; relative to checkpoints.dir",
    ("model", "kind"): '"mlp" or "cnn"',
    ("model", "hidden"): "mlp: hidden layer widths",
    ("model", "channels"): "cnn: 3x3 conv widths, each followed by 2x2 pooling",
    ("model", "dense"): "cnn: width of the dense layer after the convolutions",
    ("learner", "optimizer"): '"adam" or "sgd"',
    ("learner", "learning_rate"): "",
    ("learner", "batch_size"): "fresh examples per step (fixed shape: a short batch is padded and masked)",
    ("learner", "task"): '"classification" (integer labels) or "regression" (float targets, squared error loss)',
    ("replay", "kind"): '"reservoir", "class_balanced" or "fifo"',
    ("replay", "capacity"): "examples kept; 0 = no replay",
    ("replay", "batch_size"): "replayed examples mixed into every step",
    ("replay", "asymmetric"): "ER-ACE (Caccia et al. 2022): fresh rows' loss only over the classes they contain",
    ("ewc", "enabled"): "",
    ("ewc", "strength"): "lambda at start",
    ("ewc", "strength_min"): "lambda decays toward this on accepted windows",
    ("ewc", "strength_max"): "and is boosted up to this on regressions",
    ("ewc", "decay"): "lambda <- max(strength_min, lambda * decay) on each accepted window",
    ("ewc", "boost"): "lambda <- min(strength_max, lambda * boost) on each regression",
    ("ewc", "gamma"): "Fisher discount: F <- gamma F + F_new",
    ("ewc", "fisher_samples"): "examples per Fisher refresh",
    ("probe", "holdout_fraction"): "share of the stream held out for the probe (chosen by hashing the record key)",
    ("probe", "per_segment"): "probe examples kept per segment (reservoir)",
    ("probe", "max_segments"): "beyond this the oldest segment is dropped",
    ("probe", "window_examples"): "records without a segment: held-out examples per window segment "
    "(5,000: one per default window)",
    ("probe", "golden"): "optional .npz with arrays x, y: a fixed probe segment",
    ("probe", "every_examples"): "trained examples per window (judged, EWC consolidated on accept); "
    "judging costs what training 600-1,700 examples does",
    ("probe", "tolerance"): "accuracy drop (overall or one segment) that may count as a regression",
    ("probe", "loss_tolerance"): "regression: relative rise of the mean probe loss that may count as one (0.2 = +20%)",
    (
        "probe",
        "alpha",
    ): "significance of the one-sided paired test (McNemar on predictions; Wilcoxon on regression losses)",
    ("probe", "on_regression"): '"quarantine", "retry" (stronger lambda, then quarantine) or "halt"',
    ("probe", "max_retries"): "retries of a window before it is quarantined",
    ("probe", "min_examples"): "probe examples a segment needs before it is tested",
    ("probe", "every_seconds"): "serve: a window also closes after this long, so a slow stream is judged "
    "regularly (replay: by count only); 0 = by count only",
    (
        "probe",
        "anchor_windows",
    ): "also judge against the good model of up to this many windows ago (catches slow seepage); 0 = off",
    ("probe", "enabled"): "false: accept every candidate (to measure what the guard prevents)",
    ("checkpoints", "dir"): "checkpoint store directory",
    ("checkpoints", "keep_last"): "ordinary checkpoints kept (pinned ones are kept too)",
    (
        "checkpoints",
        "every_seconds",
    ): "at most one checkpoint per this many seconds (every window is still judged); 0 = every accepted window",
    (
        "checkpoints",
        "max_unsaved_seconds",
    ): "saves failing this long in a row (a full disk): stop with exit status 5; 0 = never stop",
    ("service", "http_host"): "a non-loopback address requires an admin token",
    ("service", "http_port"): "0 = pick a free port",
    ("service", "admin_token"): 'bearer token for POST /admin/*; give it as admin_token_env = "VAR"',
    ("service", "progress_every_s"): "seconds between one-line progress reports",
    ("service", "shutdown_timeout_s"): "SIGTERM/SIGINT: finish, check, checkpoint and exit within this",
    ("service", "seed"): "model init and probe selection; same records + config + seed = same checkpoints",
}
# Optional keys have no default to show: the example shows them commented out, with a sample value.
_OPTIONAL_SAMPLES = {
    ("probe", "golden"): 'golden = "golden-probe.npz"',
    ("service", "admin_token"): 'admin_token_env = "CONTINUITY_ADMIN_TOKEN"',
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


_FIELDS_EXAMPLE = """\
# Named-field JSON events (codec = "fields"): which fields become which model inputs.
# `continuity inspect --bootstrap HOST:PORT --topic T` prints a draft from a topic's records.
# [stream.fields]
# label = "clicked"                      # the label field: a class id (or a number for regression)
# label_classes = ["no", "yes"]          # optional: label strings, mapped to ids 0, 1, ...
# key = "user_id"                        # optional: the record's key (probe hold-out hash)
# segment = "country"                    # optional: the record's segment (probe scopes)
# standardize_every = 512                # examples per partition between statistics updates
# [stream.fields.amount]
# kind = "numeric"                       # all numeric fields form the input "numeric": float32[F]
# standardize = true                     # scaled by running mean/std (kept in checkpoints)
# default = 0.0                          # optional: used when the field is missing or null
# [stream.fields.device]
# kind = "categorical"                   # int32 id ("embedding") or float32[N] ("one_hot")
# vocabulary = ["ios", "android", "web"] # ids 0..2; anything else is 3 (out of vocabulary)
# encoding = "one_hot"
# [stream.fields.city]
# kind = "categorical"
# buckets = 1024                         # hashed (BLAKE2b of the UTF-8 text) into 1024 ids
# [stream.fields.tags]
# kind = "tokens"                        # int32[length]; 0 pads, ids from 1
# length = 16                            # truncated or padded to this
# buckets = 4096                         # or vocabulary = [...]
# optional = true                        # a missing list is empty
"""


def _fields_toml(fields: dict) -> list[str]:
    """[stream.fields] and its field tables as TOML lines."""
    lines = ["", "[stream.fields]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items() if not isinstance(value, dict)]
    for name, table in fields.items():
        if isinstance(table, dict):
            lines += ["", f"[stream.fields.{_toml_key(name)}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return lines


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_string(name)


def example_config() -> str:
    """A complete, commented config: every section and key at its default.

    It runs as is against the embedded broker (`continuity broker --port 9092`) and the
    topic `continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario
    permuted-digits` creates; its defaults are for Apache Kafka, so its header says which
    overrides make the embedded broker quick (a short session timeout). Values are rendered
    from the dataclasses' defaults, so the example cannot drift from them.
    """
    defaults = Config()
    lines = [
        "# Continuity configuration. Every key is shown with its default; unknown keys are errors.",
        "# Check a file with `continuity config check --config FILE`; override one value on any",
        "# command that takes --config with `--set section.key=value` (e.g. --set learner.batch_size=64).",
        "# Try it: `continuity broker --port 9092`, then",
        "# `continuity produce --bootstrap 127.0.0.1:9092 --topic digits --scenario permuted-digits`,",
        "# and serve with --set probe.every_examples=1000 (digits segments last ~1,400 examples)",
        "# --set stream.session_timeout_ms=6000 (the embedded broker holds a group join ~half of it).",
    ]
    for section in SECTIONS:
        lines += ["", f"# {_SECTION_NOTES[section]}", f"[{section}]"]
        for spec in _specs()[section].values():
            if spec.kind in ("security", "table"):
                continue
            comment = _COMMENTS[(section, spec.name)]
            if spec.optional and getattr(_section_object(defaults, spec), spec.name) is None:
                entry = "# " + _OPTIONAL_SAMPLES[(section, spec.name)]
            else:
                entry = f"{spec.name} = {_toml_value(getattr(_section_object(defaults, spec), spec.name))}"
            lines.append(f"{entry:<40}  # {comment}" if comment else entry)
        if section == "stream":
            lines += ["", _SECURITY_EXAMPLE.rstrip("\n")]
            lines += ["", _FIELDS_EXAMPLE.rstrip("\n")]
    return "\n".join(lines) + "\n"


# ---- command-line glue --------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set SECTION.KEY=VALUE, for every command that takes a config."""
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML config file (`continuity config example` prints one); default: built-in defaults",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set learner.batch_size=64 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set or ())
