"""The accepted model, served: POST /predict answers, and published copies for other processes.

Only a model the guard accepted and the store saved is ever served or published: the
training loop hands over an `AcceptedModel` (its params and checkpoint number) when a
checkpoint of the last good model is finalized, when it restores one at start, and after
an operator's rollback; never a candidate mid-window. So a window that is later rolled
back never reaches a client, and `/predict`'s `checkpoint` names the checkpoint whose
params answered (restore it and evaluate: the same predictions).

Threading: `Predictor.predict` runs on HTTP threads while the loop trains. It reads one
reference (`Predictor.model`), swapped whole by the loop's thread; the params it holds are
the guard's copy of the last good state, device buffers that no step ever donates (the
guard copies before a state is trained), and JAX arrays are immutable. The publisher
writes on a thread of its own, so the training thread never waits on a disk.

Requests are evaluated at fixed padded shapes (powers of two up to
`service.predict_max_rows`): a few compilations in all, none per request size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from continuity.errors import UsageError
from continuity.learner import Learner
from continuity.stream.codecs import FeatureSpec, FieldSpec, JsonCodec

log = logging.getLogger(__name__)

LATEST = "latest"  # <publish.dir>/latest -> <checkpoint>: moved only once that directory is complete
KEEP_PUBLISHED = 3  # published checkpoints kept (besides the one `latest` names)


@dataclass(frozen=True)
class AcceptedModel:
    """A model the guard accepted, as saved in checkpoint `checkpoint`."""

    params: Any  # the learner's params PyTree: device arrays that are never donated
    checkpoint: int


class PredictionError(ValueError):
    """A prediction request that cannot be answered as sent (HTTP 400); the message says why, in one line."""


class NoModelYet(LookupError):
    """No model has been accepted and checkpointed yet (HTTP 503)."""


def input_spec(learner: Learner) -> FeatureSpec:
    """What one instance of a prediction request looks like: the learner's inputs, as the JSON wire has them."""
    inputs = learner.inputs
    if isinstance(inputs, dict):
        fields = tuple(FieldSpec(name, spec.shape, np.dtype(spec.dtype).name) for name, spec in inputs.items())
        return FeatureSpec(num_classes=None, inputs=fields)
    return FeatureSpec(tuple(inputs.shape), "float32", None)


def _buckets(max_rows: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_rows`, and `max_rows` itself."""
    sizes = [2**i for i in range(int(math.log2(max_rows)) + 1) if 2**i < max_rows]
    return [*sizes, max_rows]


class Predictor:
    """Answers `{"instances": [...]}` with the last accepted model (see the module docstring on threads)."""

    def __init__(self, learner: Learner, *, max_rows: int = 256):
        if not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"`max_rows` must be an integer >= 1. Got {max_rows!r}.")
        self.learner = learner
        self.max_rows = max_rows
        self.buckets = _buckets(max_rows)
        self._codec = JsonCodec(input_spec(learner))
        self.model: AcceptedModel | None = None
        self._predict = jax.jit(lambda params, x: learner.task.predict(learner.logits(params, x)))

    def accept(self, model: AcceptedModel) -> None:
        """Serve `model` from now on (called on the loop's thread; one reference swap)."""
        self.model = model

    def features(self, body) -> tuple[Any, int]:
        """The request's instances as feature arrays and their count, or PredictionError."""
        if not isinstance(body, dict) or "instances" not in body:
            raise PredictionError('the body must be a JSON object {"instances": [...]}')
        unknown = sorted(set(body) - {"instances"})
        if unknown:
            raise PredictionError(f'unknown keys {unknown[:8]}; a request holds "instances" only')
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise PredictionError('"instances" must be a non-empty list of examples')
        if len(instances) > self.max_rows:
            raise PredictionError(
                f"{len(instances)} instances is more than service.predict_max_rows = {self.max_rows}; split the request"
            )
        x, reasons = self._codec.features(instances)
        if reasons:
            row, reason = next(iter(reasons.items()))
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise PredictionError(f"instances[{row}]: {reason}{more}")
        return x, len(instances)

    def predict(self, body) -> dict:
        """{"predictions": [...], "checkpoint": N} for a parsed request body.

        Raises PredictionError for a malformed request and NoModelYet before the first
        accepted checkpoint.
        """
        x, n = self.features(body)
        model = self.model  # one read: the whole answer comes from one model
        if model is None:
            raise NoModelYet("no accepted model yet: the first one is served once its checkpoint is saved")
        rows = next(b for b in self.buckets if b >= n)
        padded = jax.tree.map(lambda a: np.concatenate([a, np.zeros((rows - n, *a.shape[1:]), a.dtype)]), x)
        predictions = np.asarray(self._predict(model.params, padded))[:n]
        return {"predictions": predictions.tolist(), "checkpoint": model.checkpoint}


# ---- publishing ------------------------------------------------------------------------------


def param_key(path) -> str:
    """A params leaf's name in params.npz: its path in the params dict, joined by "/" ("head/kernel")."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(value):
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)


class Publisher:
    """Writes each accepted checkpoint's params and spec to `<dir>/<checkpoint>/`, then moves `latest`.

    Atomic for readers: the files are written and fsynced in a hidden temporary directory,
    which is renamed to `<checkpoint>` whole; only then is `latest` (a symlink) replaced by
    a rename, so `latest/` always names a complete model. The newest `KEEP_PUBLISHED` are
    kept. Writes happen on the publisher's own thread: `submit` only hands a model over,
    and a model not yet written when a newer one arrives is skipped (the newer one wins).
    """

    def __init__(self, directory: str | Path, spec: dict):
        self.directory = Path(directory)
        try:  # a place that cannot take models is the config's to fix, at start, not a failure per model
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(20, "a file, not a directory")
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"publish.dir: cannot publish models in {str(self.directory)!r} ({error.strerror})"
            ) from None
        self.spec = spec  # what every published model shares: inputs, task, model, config digest
        self._next: AcceptedModel | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._busy = False
        self.published: list[int] = []  # checkpoints written by this publisher, in order
        self._thread = threading.Thread(target=self._run, name="continuity-publish", daemon=True)
        self._thread.start()

    def submit(self, model: AcceptedModel) -> None:
        with self._wake:
            self._next = model
            self._wake.notify()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything submitted is written (tests, shutdown)."""
        with self._wake:
            self._wake.wait_for(lambda: self._next is None and not self._busy, timeout=timeout_s)

    def close(self) -> None:
        self.flush()
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._next is not None or self._closed)
                if self._next is None:
                    return
                model, self._next, self._busy = self._next, None, True
            try:
                self.write(model)
            except OSError as error:  # a full disk must not stop training: say so in a line, keep serving
                log.error("publishing checkpoint %s to %s failed: %s", model.checkpoint, self.directory, error)
            except Exception:  # not the file system's doing: with its traceback
                log.exception("publishing checkpoint %s to %s failed", model.checkpoint, self.directory)
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()

    def write(self, model: AcceptedModel) -> Path:
        """Publish `model` now (on the calling thread); returns its directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / str(model.checkpoint)
        if not final.exists():
            temporary = self.directory / f".partial-{model.checkpoint}-{os.getpid()}"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(model.params))[0]
            with open(temporary / "params.npz", "wb") as file:
                arrays: dict[str, Any] = {param_key(path): np.asarray(leaf) for path, leaf in leaves}
                np.savez(file, **arrays)
                file.flush()
                os.fsync(file.fileno())
            spec = {**self.spec, "checkpoint": model.checkpoint, "params": "params.npz"}
            with open(temporary / "spec.json", "w") as file:
                json.dump(spec, file, indent=1, default=_jsonable)
                file.flush()
                os.fsync(file.fileno())
            _fsync(temporary)
            os.rename(temporary, final)
        link = self.directory / f".{LATEST}-{os.getpid()}"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(str(model.checkpoint), link)  # relative: the directory may be moved or mounted elsewhere
        os.replace(link, self.directory / LATEST)
        _fsync(self.directory)
        self.published.append(model.checkpoint)
        self._prune(model.checkpoint)
        return final

    def _prune(self, latest: int) -> None:
        numbers = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        for number in numbers[:-KEEP_PUBLISHED]:
            if number != latest:
                shutil.rmtree(self.directory / str(number), ignore_errors=True)


def published_spec(learner: Learner, *, model: dict, config_digest: str) -> dict:
    """What a published model's spec.json holds besides its checkpoint: enough to rebuild the
    module (`model`: factory import path and kwargs), feed it (`inputs`) and read its outputs (`task`)."""
    inputs = learner.inputs
    described: dict[str, Any]
    if isinstance(inputs, dict):
        described = {name: {"shape": list(s.shape), "dtype": np.dtype(s.dtype).name} for name, s in inputs.items()}
    else:
        described = {"shape": list(inputs.shape), "dtype": np.dtype(inputs.dtype).name}
    task = learner.task
    return {
        "format": 1,
        "inputs": described,
        "task": {
            "name": type(task).__name__,
            "args": asdict(task) if is_dataclass(task) else {},
            "outputs": task.outputs,
        },
        "model": model,
        "config_digest": config_digest,
        "learner": learner.describe(),
    }
