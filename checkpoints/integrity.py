"""Content digests of a checkpoint's arrays, and a manifest of its files: corruption is found, never restored.

Orbax 0.12 writes arrays through TensorStore, zstd-compressed but without a checksum, so
bytes changed on disk inside an incompressible array (float weights) restore silently:
overwriting 8 bytes of a state file gave parameters off by 1e38 and no error. So:

- Every array gets a CRC-32C (Castagnoli) of its bytes, computed from the host copy in
  the store's writer thread (never the training thread) and saved in the checkpoint's
  JSON item; every restore recomputes them and a mismatch is a CorruptCheckpointError
  naming the array. Per array rather than one per checkpoint: the cost is the same
  (BENCHMARKS.md, "Reliability"), and the error says which array changed. The `crc32c`
  package uses the CPU's CRC32 instruction (SSE4.2 / ARMv8).
- One SHA-256 over the params alone identifies a model: equal digests mean bit-identical
  parameters (`checkpoints show`; the same bytes `continuity.loop.params_digest` hashes).
- After a checkpoint is finalized, the writer records the size of each of its files in
  `files.json` inside it, so `checkpoints list` can tell a truncated or missing file
  from a stat alone, without reading any data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import crc32c
import numpy as np

ALGORITHM = "crc32c"
FILES_MANIFEST = "files.json"
PARAMS_KEY = "params"  # the state subtree whose SHA-256 identifies a model


def key_name(entry) -> str:
    """One jax key-path entry as the string Orbax uses for it in a checkpoint's tree."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def leaves_by_path(tree) -> list[tuple[str, object]]:
    """(path, leaf) of every leaf in flatten order; a path joins key names with "/" ("params/head/bias")."""
    import jax

    return [("/".join(key_name(e) for e in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _bytes(leaf) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(leaf))


def array_digests(tree) -> dict[str, str]:
    """{path: CRC-32C of the leaf's bytes, 8 hex digits} for every array leaf of `tree`."""
    return {path: f"{crc32c.crc32c(_bytes(leaf).data):08x}" for path, leaf in leaves_by_path(tree)}


def params_sha256(tree) -> str | None:
    """SHA-256 over the bytes of the `params` subtree's leaves, in order; None when `tree` has no params."""
    digest, found = hashlib.sha256(), False
    for path, leaf in leaves_by_path(tree):
        if path.split("/", 1)[0] == PARAMS_KEY:
            digest.update(_bytes(leaf).tobytes())
            found = True
    return digest.hexdigest() if found else None


def state_digest(digests: Mapping[str, str]) -> str:
    """One SHA-256 over a tree's per-array digests: equal when every array is (read from the metadata alone)."""
    text = "\n".join(f"{path}={digests[path]}" for path in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def describe(state, probe: Mapping) -> dict:
    """The `integrity` entry of a checkpoint's JSON item: digests of its state and probe arrays."""
    return {
        "algorithm": ALGORITHM,
        "state": array_digests(state),
        "probe": array_digests(dict(probe)),
        "params_sha256": params_sha256(state),
    }


def mismatch(item: str, expected: Mapping[str, str], tree) -> str | None:
    """Why `tree` (item "state" or "probe", as read back) differs from its saved digests; None when it does not."""
    actual = array_digests(tree)
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"{item} array {missing[0]} is missing ({len(missing)} missing)"
    extra = sorted(set(actual) - set(expected))
    if extra:
        return f"{item} array {extra[0]} was not saved ({len(extra)} unexpected)"
    for path in sorted(expected):
        if actual[path] != expected[path]:
            saved, read = expected[path], actual[path]
            return f"{item} array {path} does not match its digest ({ALGORITHM} saved {saved}, read {read})"
    return None


# ---------------------------------------------------------------------------- the files manifest


def write_manifest(step_directory: Path) -> None:
    """Record the size of every file of a finalized checkpoint in its files.json (atomically)."""
    sizes = {
        str(path.relative_to(step_directory)): path.stat().st_size
        for path in sorted(step_directory.rglob("*"))
        if path.is_file() and path.name != FILES_MANIFEST
    }
    target = step_directory / FILES_MANIFEST
    temporary = step_directory / f".{FILES_MANIFEST}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"sizes": sizes}, handle, indent=0)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def check_files(step_directory: Path) -> tuple[str, str | None]:
    """("intact", None), ("unverified", why) without a manifest, or ("corrupt", why): a stat per file."""
    try:
        manifest = json.loads((step_directory / FILES_MANIFEST).read_text(encoding="utf-8"))
        sizes = manifest["sizes"]
        if not isinstance(sizes, dict):
            raise TypeError("sizes is not an object")
    except FileNotFoundError:
        return "unverified", f"no {FILES_MANIFEST} (saved before file manifests, or the writer stopped right after)"
    except (OSError, ValueError, TypeError, KeyError) as error:
        return "corrupt", f"{FILES_MANIFEST} is unreadable ({type(error).__name__})"
    for name, size in sizes.items():
        try:
            actual = (step_directory / name).stat().st_size
        except FileNotFoundError:
            return "corrupt", f"file {name} is missing"
        if actual != size:
            return "corrupt", f"file {name} has {actual} bytes, {size} when written"
    return "intact", None
