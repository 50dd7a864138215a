"""Gap-aware offset tracking for one partition: commit only the contiguous prefix of done records.

Records finish out of order when different keys run concurrently; committing the highest done
offset would skip a record still in flight, and a crash would then lose it. The tracker answers
"where must a restart begin", which is the first record not yet done. A record that never
finishes (revoked or stopped before it ran) simply stays pending and holds the prefix back.
"""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None

    def add(self, offset: int) -> None:
        """Register a record in offset order, before it starts."""
        self._order.append(offset)

    def done(self, offset: int) -> None:
        self._done.add(offset)
        order, finished = self._order, self._done
        while order and order[0] in finished:
            head = order.popleft()
            finished.discard(head)
            self._next = head + 1

    @property
    def pending(self) -> int:
        """Records from the first one not done on: what a restart would read again."""
        return len(self._order)

    @property
    def open(self) -> int:
        """Records not done yet (done ones behind an unfinished record are pending but not open)."""
        return len(self._order) - len(self._done)

    def committable(self) -> int | None:
        """The offset to commit (the next record to read), or None when nothing has finished yet."""
        return self._next
