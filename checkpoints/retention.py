"""Which checkpoints a store may delete: a pure decision, kept apart from the deleting.

Orbax's own policies are not used for this: a best-N policy alone may delete the
newest step, and metrics only persist when `best_fn` is set (Orbax 0.12). The rule
here is simple enough to state in one line and to test without a file system.
"""

from __future__ import annotations

from collections.abc import Iterable


def checkpoints_to_delete(
    numbers: Iterable[int],
    *,
    keep_last: int,
    last_good: int | None,
    pinned: Iterable[int] = (),
) -> list[int]:
    """The checkpoint numbers to delete, oldest first.

    Keeps the newest `keep_last` numbers, `last_good` (what a restart restores), and
    every pinned number; deletes the rest. `keep_last` must be >= 1 so the newest
    checkpoint, which also fixes the next number the store assigns, always survives.
    """
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"`keep_last` must be an integer >= 1. Got {keep_last!r}.")
    ordered = sorted(set(numbers))
    keep = set(ordered[-keep_last:]) | set(pinned)
    if last_good is not None:
        keep.add(last_good)
    return [n for n in ordered if n not in keep]
