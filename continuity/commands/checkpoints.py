"""`continuity checkpoints list|show|diff|verify|repair|pin|unpin|export` and `continuity rollback`: a store on disk.

Reading commands (list, show, verify, export) open the store read-only and work while a
service owns it. Commands that change it (pin, unpin, rollback, repair) must own the
directory (its store.lock): while a service runs there, pin, unpin and rollback go
through it (`--url`, or `--config` for its [service] address; the admin token from the
environment), and without a way to reach it they are refused, never half-applied.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from continuity.commands.arguments import add_set_argument
from continuity.errors import UsageError

DEFAULT_TOKEN_ENV = "CONTINUITY_ADMIN_TOKEN"
CKPT_HELP = "checkpoint number (the CKPT column of `checkpoints list`)"
CORRUPT_EXIT_STATUS = 1  # `verify` found a corrupt checkpoint


def register(subparsers) -> None:
    group = subparsers.add_parser(
        "checkpoints", help="list, inspect, verify, repair, pin and export checkpoints in a store"
    )
    commands = group.add_subparsers(dest="checkpoints_command", metavar="COMMAND", parser_class=type(group))
    commands.required = True

    listing = commands.add_parser("list", help="a table of the store's checkpoints, oldest first")
    _add_store(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    listing.set_defaults(handler=run_list)

    show = commands.add_parser(
        "show", help="one checkpoint's full metadata as JSON, with the params SHA-256 and a digest of its state"
    )
    show.add_argument("checkpoint", type=_checkpoint_number, metavar="CKPT", help=CKPT_HELP)
    _add_store(show)
    show.set_defaults(handler=run_show)

    diff = commands.add_parser(
        "diff",
        help="what differs between two checkpoints: arrays, the largest params difference, metadata "
        "(positions, step, lambda, probe figures)",
    )
    diff.add_argument("first", type=_checkpoint_number, metavar="CKPT_A", help=CKPT_HELP)
    diff.add_argument("second", type=_checkpoint_number, metavar="CKPT_B", help=CKPT_HELP)
    _add_store(diff)
    diff.add_argument("--json", action="store_true", help="print JSON instead of text")
    diff.set_defaults(handler=run_diff)

    verify = commands.add_parser(
        "verify",
        help="read checkpoints back and check every array against its saved digest (exit 1 if any is corrupt)",
    )
    verify.add_argument(
        "checkpoint", type=_checkpoint_number, nargs="?", metavar="CKPT", help=f"{CKPT_HELP} (default: all)"
    )
    _add_store(verify)
    verify.set_defaults(handler=run_verify)

    repair = commands.add_parser(
        "repair",
        help="rebuild a lost or garbled store.json from the checkpoint directories and the ledger",
    )
    _add_store(repair)
    repair.set_defaults(handler=run_repair)

    for name, verb in (("pin", "keep it through retention"), ("unpin", "let retention delete it again")):
        parser = commands.add_parser(name, help=f"{name} a checkpoint: {verb} (through a running service)")
        parser.add_argument("checkpoint", type=_checkpoint_number, metavar="CKPT", help=CKPT_HELP)
        _add_service_arguments(parser, action=name)
        parser.set_defaults(handler=run_pin, pin=name == "pin")

    export = commands.add_parser("export", help="write a checkpoint's params as .msgpack (flax) or .npz")
    export.add_argument("checkpoint", type=_checkpoint_number, metavar="CKPT", help=CKPT_HELP)
    _add_store(export)
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="FILE.msgpack or FILE.npz")
    export.set_defaults(handler=run_export)

    rollback = subparsers.add_parser(
        "rollback",
        help="roll a running service back (--url, --config), or make a good checkpoint the one the next start "
        "restores (--dir)",
    )
    _add_service_arguments(rollback, action="rollback")
    rollback.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the service to finish the rollback (default 30)",
    )
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--to",
        type=_checkpoint_number,
        metavar="CKPT",
        help="this checkpoint (must be good; the CKPT column of `list`)",
    )
    target.add_argument("--last-good", action="store_true", help="the newest good checkpoint not abandoned")
    rollback.add_argument("--reason", default="manual rollback", help="recorded in the ledger")
    rollback.set_defaults(handler=run_rollback)


def _add_store(parser: argparse.ArgumentParser) -> None:
    """--dir DIR, or --config FILE (its [checkpoints] dir, with --set overrides): where the store is."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path, metavar="DIR", help="the checkpoint store directory")
    where.add_argument("--config", metavar="FILE", help="a service's config: the store is its [checkpoints] dir")
    add_set_argument(parser, "with --config: override one config value (repeatable)")


def store_directory(args) -> Path:
    """The store directory `--dir` names, or the [checkpoints] dir of `--config` (with its --set overrides)."""
    if args.config is None:
        if args.set:
            raise UsageError("--set overrides a config: give it with --config FILE")
        return args.dir
    from continuity.config import load_config

    return Path(load_config(args.config, args.set or ()).checkpoints.dir)  # ConfigError is a UsageError


def _add_service_arguments(parser: argparse.ArgumentParser, *, action: str) -> None:
    """--dir, --url, --config, --set, --token-env: where the store is, and the service that may own it."""
    parser.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="the checkpoint store directory; with --url, the fallback when no service runs",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help=f"a running service's HTTP address (e.g. http://127.0.0.1:8080): ask it to {action}",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the service's config: its [service] http_host/http_port give --url, its admin "
        "token the token, its [checkpoints] dir the --dir (explicit options win)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )
    parser.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        metavar="VAR",
        help=f"environment variable holding the admin token (default {DEFAULT_TOKEN_ENV}); "
        "never given on the command line",
    )
    if action != "rollback":
        parser.set_defaults(timeout=30.0)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a timeout must be a positive number of seconds, got {text!r}")
    return value


def _checkpoint_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a checkpoint number must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a checkpoint number must be a positive integer, got {value}")
    return value


# ---------------------------------------------------------------------------- store access


def open_store(directory: Path):
    """The store at `directory` for reading (no lock: a service may own it); errors as UsageError."""
    from continuity.checkpoints import CheckpointNotFoundError, CheckpointStore, StoreAccessError

    try:
        return CheckpointStore(directory, create=False)
    except StoreAccessError as error:
        raise UsageError(error.strerror) from None
    except CheckpointNotFoundError as error:
        raise UsageError(str(error)) from None
    except ValueError as error:  # StoreFileError: an unreadable store.json (the message says how to repair it)
        raise UsageError(str(error)) from None


def open_owned_store(directory: Path, *, action: str, token_env: str = DEFAULT_TOKEN_ENV, repair: bool = False):
    """The store at `directory`, owned (locked) for a change; a UsageError saying who holds it when another does."""
    from continuity.checkpoints import CheckpointNotFoundError, CheckpointStore, StoreAccessError, StoreLockedError

    try:
        return CheckpointStore(directory, create=False, owner=True, repair=repair)
    except StoreAccessError as error:
        raise UsageError(f"{action} refused: {error.strerror}") from None
    except StoreLockedError as error:
        url = error.holder.get("url")
        raise UsageError(
            f"{action} refused: {error}; ask it with --url {url or 'URL'} or --config FILE (admin token from "
            f"${token_env}), or stop it first"
        ) from None
    except CheckpointNotFoundError as error:
        raise UsageError(str(error)) from None
    except ValueError as error:  # StoreFileError
        raise UsageError(str(error)) from None


def _require_checkpoints(store) -> None:
    if not store.numbers():
        raise UsageError(f"{store.directory} holds no checkpoints yet")


def _call(function, *args, **kwargs):
    """Runs a store operation, turning what a user can fix into one-line UsageErrors."""
    from continuity.checkpoints import (
        CheckpointNotFoundError,
        CorruptCheckpointError,
        ExportDestinationError,
        StoreAccessError,
    )

    try:
        return function(*args, **kwargs)
    # An export destination or store that cannot be used names its path itself.
    except (
        CheckpointNotFoundError,
        CorruptCheckpointError,
        ValueError,
        ExportDestinationError,
        StoreAccessError,
    ) as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a full or read-only disk
        raise UsageError(f"cannot write to the checkpoint directory: {error}") from None


# ---------------------------------------------------------------------------- formatting


def format_positions(positions) -> str:
    """Compact positions: "t/0:1200 t/1:980" (a "+k" suffix when k examples of that record are done)."""
    if not positions:
        return "-"
    entries: list[tuple[str, str | None, Any, Any]] = []  # (topic, partition or None, offset, skip) as saved
    if isinstance(positions, dict):  # {"topic/partition": offset} or {topic: {partition: offset}}
        for key, value in positions.items():
            if isinstance(value, dict):
                entries.extend((str(key), str(p), o, 0) for p, o in value.items())
            else:
                entries.append((str(key), None, value, 0))
    elif isinstance(positions, list):
        for entry in positions:
            if isinstance(entry, dict):
                entries.append(
                    (
                        str(entry.get("topic", "?")),
                        str(entry.get("partition", "?")),
                        entry.get("offset", "?"),
                        entry.get("skip", 0),
                    )
                )
            elif isinstance(entry, (list, tuple)) and len(entry) >= 3:
                entries.append((str(entry[0]), str(entry[1]), entry[2], 0))
    parts = []
    for topic, partition, offset, skip in entries:
        where = topic if partition is None else f"{topic}/{partition}"
        parts.append(f"{where}:{offset}" + (f"+{skip}" if skip else ""))
    return " ".join(parts) or "-"


def _probe_figure(metadata: dict) -> str:
    """The probe accuracy, or "loss X" for a regression task's checkpoint; "-" when neither."""
    probe = metadata.get("probe")
    for key, pattern in (("accuracy", "{:.4f}"), ("loss", "loss {:.4g}")):
        value = probe.get(key) if isinstance(probe, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return pattern.format(value)
    return "-"


def _saved_time(metadata: dict) -> str:
    saved_at = metadata.get("saved_at")
    if not isinstance(saved_at, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved_at))


def _status(info) -> str:
    """ "good", "good HEAD", "good (not verified)", "abandoned", "corrupt: why"."""
    word = "corrupt" if info.condition == "corrupt" else "abandoned" if info.abandoned else info.status
    text = f"{word} HEAD" if info.head else word
    if info.condition == "unverified" and word == "good":
        text += " (not verified)"
    if info.condition == "corrupt":
        text += f": {info.problem}"
    return text


def _digests(metadata: dict) -> dict:
    """The params SHA-256 and a digest of the whole state, from the metadata alone (None when not saved)."""
    from continuity.checkpoints.integrity import state_digest

    saved = metadata.get("integrity")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return {"params_sha256": None, "state_digest": None}
    return {"params_sha256": saved.get("params_sha256"), "state_digest": state_digest(saved["state"])}


def _info_json(info) -> dict:
    return {
        "checkpoint": info.number,
        "status": info.status,
        "condition": info.condition,
        "problem": info.problem,
        "pinned": info.pinned,
        "abandoned": info.abandoned,
        "head": info.head,
        "metadata": info.metadata,
    }


def format_table(infos) -> str:
    header = ("CKPT", "STEP", "SAVED", "POSITIONS", "PROBE", "PINNED", "STATUS")
    rows = [header]
    for info in infos:
        step = info.metadata.get("learner_step")
        rows.append(
            (
                str(info.number),
                "-" if step is None else str(step),
                _saved_time(info.metadata),
                format_positions(info.metadata.get("positions")),
                _probe_figure(info.metadata),
                "yes" if info.pinned else "-",
                _status(info),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _describe(store, number: int) -> str:
    info = store.info(number)
    step = info.metadata.get("learner_step")
    details = [f"saved {_saved_time(info.metadata)}"]
    if step is not None:
        details.insert(0, f"learner step {step}")
    if info.metadata.get("positions"):
        details.append(f"positions {format_positions(info.metadata['positions'])}")
    return f"checkpoint {number} ({', '.join(details)})"


def format_verification(verification) -> str:
    """One line: "checkpoint 3: ok (43 arrays, 1,960,166 bytes)" / "checkpoint 4: corrupt: why"."""
    if verification.result == "ok":
        return f"checkpoint {verification.number}: ok ({verification.detail})"
    if verification.result == "unverified":
        return f"checkpoint {verification.number}: not verified: {verification.detail}"
    return f"checkpoint {verification.number}: corrupt: {verification.detail}"


# What `diff` compares of the metadata: what a checkpoint stands for, beyond its arrays.
DIFF_FIELDS = (
    "status",
    "learner_step",
    "lineage_examples",
    "positions",
    "ewc_strength",
    "quarantined_records",
    "parent",
    "config_digest",
    "segment_names",
    "topics",
)


def _probe_figures(metadata: dict) -> dict:
    """{"probe accuracy": 0.84, "probe perm-0": 0.9, ...} (or "probe loss" for a regression task)."""
    probe = metadata.get("probe")
    if not isinstance(probe, dict):
        return {}
    figures = {f"probe {key}": probe[key] for key in ("accuracy", "loss") if key in probe}
    segments = probe.get("segments")
    if isinstance(segments, dict):
        figures.update({f"probe {name}": value for name, value in segments.items()})
    return figures


def _array_differences(first: dict | None, second: dict | None) -> dict | None:
    """Paths whose saved digests differ, or that only one side has; None when either saved none."""
    if not isinstance(first, dict) or not isinstance(second, dict):
        return None
    return {
        "differ": sorted(p for p in set(first) & set(second) if first[p] != second[p]),
        "only_in_a": sorted(set(first) - set(second)),
        "only_in_b": sorted(set(second) - set(first)),
        "arrays": len(set(first) | set(second)),
    }


def compare_checkpoints(first: dict, second: dict, first_params: dict, second_params: dict) -> dict:
    """What differs between two checkpoints, from their metadata and their params ({path: array}).

    Arrays are compared by their saved digests (every array of the state and of the probe),
    the params also by value: the largest absolute difference over the arrays both have
    with the same shape. Metadata: the DIFF_FIELDS and the probe figures that differ.
    """
    digests: list[dict] = [m["integrity"] if isinstance(m.get("integrity"), dict) else {} for m in (first, second)]
    shared = [
        p for p in sorted(set(first_params) & set(second_params)) if first_params[p].shape == second_params[p].shape
    ]
    largest = max(
        (
            float(np.max(np.abs(first_params[p].astype(np.float64) - second_params[p].astype(np.float64)), initial=0.0))
            for p in shared
        ),
        default=None,
    )
    params: dict[str, Any] = {
        "sha256": [digests[0].get("params_sha256"), digests[1].get("params_sha256")],
        "max_abs_difference": largest,
        "differ": [p for p in shared if not np.array_equal(first_params[p], second_params[p])],
        "shapes_differ": sorted(p for p in set(first_params) & set(second_params) if p not in shared),
        "only_in_a": sorted(set(first_params) - set(second_params)),
        "only_in_b": sorted(set(second_params) - set(first_params)),
    }
    params["identical"] = not any(params[k] for k in ("differ", "shapes_differ", "only_in_a", "only_in_b"))
    metadata: dict[str, list] = {}
    for key in DIFF_FIELDS:
        if first.get(key) != second.get(key):
            metadata[key] = [first.get(key), second.get(key)]
    figures = [_probe_figures(first), _probe_figures(second)]
    for key in sorted(set(figures[0]) | set(figures[1])):
        if figures[0].get(key) != figures[1].get(key):
            metadata[key] = [figures[0].get(key), figures[1].get(key)]
    return {
        "checkpoints": [first.get("checkpoint"), second.get("checkpoint")],
        "params": params,
        "state": _array_differences(digests[0].get("state"), digests[1].get("state")),
        "probe": _array_differences(digests[0].get("probe"), digests[1].get("probe")),
        "metadata": metadata,
    }


def _listing(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _metadata_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "positions":
        return format_positions(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def format_diff(difference: dict) -> str:
    """`checkpoints diff` as text: params, then the arrays whose digests differ, then the metadata."""
    a, b = difference["checkpoints"]
    params = difference["params"]
    lines = [f"checkpoint {a} vs checkpoint {b}"]
    if params["identical"]:
        lines.append(f"params:   identical (SHA-256 {params['sha256'][0] or 'not recorded'})")
    else:
        largest = params["max_abs_difference"]
        shape = "" if largest is None else f"; largest |a - b| {largest:.6g}"
        lines.append(f"params:   {len(params['differ'])} arrays differ{shape}: {_listing(params['differ'])}")
        for key, what in (
            ("shapes_differ", "shapes differ"),
            ("only_in_a", f"only in {a}"),
            ("only_in_b", f"only in {b}"),
        ):
            if params[key]:
                lines.append(f"          {what}: {_listing(params[key])}")
    for item in ("state", "probe"):
        found = difference[item]
        if found is None:
            lines.append(f"{item + ':':<9} not compared (a checkpoint saved without content digests)")
            continue
        changed = found["differ"] + found["only_in_a"] + found["only_in_b"]
        summary = (
            f"{len(changed)} of {found['arrays']} arrays differ" if changed else f"all {found['arrays']} arrays equal"
        )
        lines.append(f"{item + ':':<9} {summary}" + (f": {_listing(changed)}" if changed else ""))
    if difference["metadata"]:
        width = max(len(key) for key in difference["metadata"])
        lines.append("metadata:")
        for key, (first, second) in difference["metadata"].items():
            lines.append(f"  {key:<{width}}  {_metadata_value(key, first)} -> {_metadata_value(key, second)}")
    else:
        lines.append("metadata: no difference in " + ", ".join(DIFF_FIELDS) + " or the probe figures")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- handlers


def run_list(args) -> int:
    store = open_store(store_directory(args))
    try:
        _require_checkpoints(store)
        infos = store.list()
        if args.json:
            print(json.dumps([_info_json(info) for info in infos], indent=2))
        else:
            print(format_table(infos))
        return 0
    finally:
        store.close()


def run_show(args) -> int:
    store = open_store(store_directory(args))
    try:
        _require_checkpoints(store)
        info = _call(store.info, args.checkpoint)
        print(json.dumps({**_info_json(info), **_digests(info.metadata)}, indent=2))
        return 0
    finally:
        store.close()


def run_diff(args) -> int:
    """Reads both checkpoints' params (checked against their digests) and compares them with their metadata."""
    store = open_store(store_directory(args))
    try:
        _require_checkpoints(store)
        first, second = (_call(store.info, number).metadata for number in (args.first, args.second))
        first_params, second_params = (_call(store.read_params, number) for number in (args.first, args.second))
        difference = compare_checkpoints(first, second, first_params, second_params)
        print(json.dumps(difference, indent=2, default=str) if args.json else format_diff(difference))
        return 0
    finally:
        store.close()


def run_verify(args) -> int:
    """One line per checkpoint; exit 1 when any is corrupt (each finding also goes to the ledger, or, on a
    store this process may not write, a line on stderr says the findings are not recorded there)."""
    store = open_store(store_directory(args))
    try:
        _require_checkpoints(store)
        numbers = [args.checkpoint] if args.checkpoint is not None else store.numbers()
        corrupt, unrecorded = 0, []
        for number in numbers:
            verification = _call(store.verify, number)
            corrupt += verification.result == "corrupt"
            if verification.unrecorded is not None:
                unrecorded.append(verification.unrecorded)
            print(format_verification(verification), flush=True)
        if unrecorded:
            which = "the findings above" if len(unrecorded) == len(numbers) else f"{len(unrecorded)} of the findings"
            print(
                f"continuity: verify could not record {which} in {store.ledger.path}: {unrecorded[0]}; "
                "the store was left as it was",
                file=sys.stderr,
                flush=True,
            )
        return CORRUPT_EXIT_STATUS if corrupt else 0
    finally:
        store.close()


def run_repair(args) -> int:
    """Rebuild store.json when it is missing or unreadable; say what it holds either way."""
    store = open_owned_store(store_directory(args), action="repair", repair=True)
    try:
        if store.repaired is not None:
            print(store.repaired)
        else:
            print(f"{store.directory / 'store.json'} is readable ({store.describe_marks()}); nothing to rebuild")
        return 0
    finally:
        store.close()


def run_export(args) -> int:
    store = open_store(store_directory(args))
    try:
        _require_checkpoints(store)
        out = _call(store.export_params, args.checkpoint, args.out)
        print(f"wrote the params of checkpoint {args.checkpoint} to {out}")
        return 0
    finally:
        store.close()


def run_pin(args) -> int:
    """Through the service that owns the store when --url/--config reach one; else in the directory."""
    verb = "pin" if args.pin else "unpin"

    def in_directory(directory: Path) -> int:
        store = open_owned_store(directory, action=verb, token_env=args.token_env)
        try:
            _require_checkpoints(store)
            _call(store.pin if args.pin else store.unpin, args.checkpoint)
            print(f"checkpoint {args.checkpoint} {verb}ned")
            return 0
        finally:
            store.close()

    return _operator_action(
        args,
        command=verb,
        path=f"/admin/{verb}",
        body={"checkpoint": args.checkpoint},
        done=lambda url, answer: (
            f"the service at {url} {verb}ned checkpoint {answer.get('checkpoint', args.checkpoint)}"
        ),
        in_directory=in_directory,
    )


def run_rollback(args) -> int:
    """Over HTTP when --url (or --config) names a service; in the directory when none runs there."""

    def done(url: str, answer: dict) -> str:
        checkpoint = answer.get("checkpoint", answer.get("to"))
        detail = f" to checkpoint {checkpoint}" if checkpoint is not None else ""
        return f"the service at {url} rolled back{detail}: {json.dumps(answer, default=str)}"

    body: dict[str, object] = {"to": args.to} if args.to is not None else {"last_good": True}
    body["reason"] = args.reason
    return _operator_action(
        args,
        command="rollback",
        path="/admin/rollback",
        body=body,
        done=done,
        in_directory=lambda directory: rollback_in_directory(
            directory, to=args.to, last_good=args.last_good, reason=args.reason, token_env=args.token_env
        ),
    )


def _operator_action(
    args,
    *,
    command: str,
    path: str,
    body: dict,
    done: Callable[[str, dict], str],
    in_directory: Callable[[Path], int],
) -> int:
    """Ask the service at --url (or the one --config describes) first; the directory when none answers there.

    The directory is only changed by taking its lock, so a service running there that
    could not be reached refuses the change instead of having it undone.
    """
    url, directory, config_token = args.url, args.dir, None
    if args.config is not None or args.set:
        from continuity.config import load_config

        config = load_config(args.config, args.set or ())  # ConfigError is a UsageError
        service = config.service
        if url is None and service.http_port != 0:  # port 0: a free port, not knowable from the file
            url = f"http://{_client_host(service.http_host)}:{service.http_port}"
        directory = directory if directory is not None else Path(config.checkpoints.dir)
        config_token = service.admin_token
    if url:
        token = os.environ.get(args.token_env) or config_token  # never from argv: it shows up in `ps`
        answer = ask_service(
            url, path, body, token=token, token_env=args.token_env, timeout_s=args.timeout, command=command
        )
        if answer is not None:
            print(done(url, answer))
            return 0
        if directory is None:
            raise UsageError(
                f"no service is running at {url}; pass --dir DIR to {command} in the checkpoint directory instead"
            )
        print(f"no service is running at {url}; {command} in the checkpoint directory {directory} instead")
    elif directory is None:
        raise UsageError(
            f"{command} needs --url URL or --config FILE (a running service), or --dir DIR (a checkpoint directory)"
        )
    return in_directory(directory)


def _client_host(host: str) -> str:
    """Where this machine reaches a service bound to `host` (a wildcard bind is reached via loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        host = "::1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def ask_service(
    url: str, path: str, body: dict, *, token: str | None, token_env: str, timeout_s: float, command: str
) -> dict | None:
    """POST an admin request to the service at `url`: its answer, or None when no service runs there."""
    from continuity.http import AdminRequestError, AdminTimeout, ServiceUnreachable, admin_request

    try:
        return admin_request(url, path, body, token=token, timeout_s=timeout_s)
    except ServiceUnreachable:
        return None
    except ValueError as error:  # a malformed URL
        raise UsageError(str(error)) from None
    except AdminTimeout as error:
        raise UsageError(f"{error}; see `continuity checkpoints list`") from None
    except AdminRequestError as error:
        hint = ""
        if error.status == 401 and token is None:
            hint = f" (the admin token is read from ${token_env}, which is not set)"
        status = f"HTTP {error.status}: " if error.status else ""
        raise UsageError(f"the service at {url} refused the {command}: {status}{error.message}{hint}") from None


def rollback_in_directory(
    directory: Path,
    to: int | None = None,
    last_good: bool = False,
    reason: str = "manual rollback",
    token_env: str = DEFAULT_TOKEN_ENV,
) -> int:
    """Sets the head of the store at `directory` (owning it meanwhile) and says what the next start restores.

    The target is read back and checked against its digests first: a corrupt one changes nothing.
    """
    if (to is None) == (not last_good):
        raise UsageError("rollback needs exactly one of --to CKPT or --last-good")
    store = open_owned_store(directory, action="rollback", token_env=token_env)
    try:
        _require_checkpoints(store)
        if last_good:
            target = store.newest_good()
            if target is None:
                raise UsageError(f"{store.directory} has no good checkpoint that is not abandoned")
            if store.head == target:
                print(f"the next start already restores {_describe(store, target)}")
                return 0
        else:
            target = to
        verification = _call(store.verify, target)
        if verification.result == "corrupt":
            raise UsageError(
                f"checkpoint {target} is corrupt ({verification.detail}); nothing was changed: roll back to "
                f"another one (see `continuity checkpoints verify --dir {store.directory}`)"
            )
        _call(store.set_head, target, reason=reason)
        print(f"the next start restores {_describe(store, target)}")
        return 0
    finally:
        store.close()
