"""A command's result written as a JSON file (`--json PATH`): whole or not at all, and a
failure that names the file.

Written beside the file and renamed into place, so a full disk or a kill leaves the file as
it was instead of an empty or torn one. A path that is not a regular file (`/dev/stdout`, a
pipe) is written straight through: renaming onto it would replace it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, result: dict) -> None:
    """`result` as indented JSON at `path`, its folders made; an OSError naming `path` if it cannot be."""
    text = json.dumps(result, indent=2) + "\n"
    try:
        if path.exists() and not path.is_file():  # a device or a pipe, through a link too (/dev/stdout)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            return
        target = path.resolve() if path.is_symlink() else path  # the rename would replace the link itself
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise OSError(f"cannot write {str(path)!r}: {error.strerror or error}") from None
