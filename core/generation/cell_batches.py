"""Split a grid's cells into transformer batches of nearly equal size.

Nine cells with at most four per batch go as 3+3+3, not 4+4+1: the same number of sampler calls, but no
call left running one lonely cell at low GPU utilisation, and equal shapes let one compiled graph serve
every batch. Order is kept, so images come back α-major whatever the batch size.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def contiguous_blocks(items: Sequence[T], count: int) -> list[list[T]]:
    """`count` consecutive blocks of `items`, order kept, sizes differing by at most one (the first ones larger);
    empty blocks when `count` exceeds the items. Also how `core/fanout.py` deals identities to processes."""
    base, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def split_evenly(items: Sequence[T], max_batch: int) -> list[list[T]]:
    """Consecutive batches of at most `max_batch` items, as few as possible, sizes differing by at most one."""
    max_batch = max(1, int(max_batch))
    n = len(items)
    if n == 0:
        return []
    return contiguous_blocks(items, -(-n // max_batch))
