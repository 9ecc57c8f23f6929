"""This machine's memory, and byte counts written for a reader.

Apart from the factory (which imports JAX) so that commands sizing host-side work, such as
`produce` drawing a drift stream, can check it without starting JAX.
"""

from __future__ import annotations

import os
from pathlib import Path


def host_memory() -> int | None:
    """This machine's physical memory, or its container's limit (cgroup v2 or v1) where lower; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # v2 says "max" when unlimited
            limits.append(int(text))
    return min(limits) if limits else None


def byte_size(count: int) -> str:
    """`count` bytes for a reader: 264.0 GB, 12.5 MB, 264 bytes."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"
