"""Back-pressure per partition for the kafka source (no client library here: plain arithmetic, easy to test).

Each partition gets a share of the in-flight window (``max_in_flight`` / assigned partitions; with ordering none
/ partitions that have work), so a partition stuck on retries holds at most its share while the others go on. A
partition may hold at most its share + max(share, 256) outstanding records (buffered + in flight); it is polled
while at least half of that buffer allowance is free, and a poll takes no more than the least free room of the
polled partitions, so no partition ever passes its cap and polls stay reasonably large.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from bridge.sources.kafka._offsets import PartitionTrack

MIN_BUFFER = 256  # records a partition may hold beyond its share of the window
MAX_FETCH_RECORDS = 500  # most records taken from the client per poll


class Shares:
    """The rules above for one source: ``max_in_flight`` and ``ordering`` of its config."""

    def __init__(self, max_in_flight: int, ordering: str) -> None:
        self._window = max_in_flight
        self._by_work = ordering == "none"

    def share(self, assigned: int, with_work: int) -> int:
        """How many events of one partition may be in flight, with ``assigned`` partitions of which ``with_work``
        have outstanding records. With ordering partition or key a stuck event holds every later event of its
        partition or key in the window, so each assigned partition gets a fixed share; with ordering none events
        never wait on one another and the window is split between the partitions that have work."""
        return max(1, self._window // max(1, with_work if self._by_work else assigned))

    def free_room(self, outstanding: int, assigned: int, with_work: int) -> tuple[int, bool]:
        """A partition's free room (records it may take before reaching its cap) and whether it may be polled."""
        share = self.share(assigned, with_work + (0 if outstanding else 1))
        allowance = max(share, MIN_BUFFER)
        room = share + allowance - outstanding
        return room, room >= allowance // 2

    def fetchable(self, assigned: Collection[Any], parts: Mapping[tuple[str, int], PartitionTrack]
                  ) -> tuple[list[Any], int, bool]:
        """Of the ``assigned`` partitions (anything with ``topic`` and ``partition``), those to poll, how many
        records one poll may take, and whether some partition is left out."""
        if not assigned:
            return [], MIN_BUFFER, False  # (re)joining: records of new partitions may come first
        with_work = sum(1 for p in parts.values() if p.outstanding)
        fetchable: list[Any] = []
        least_room = MAX_FETCH_RECORDS
        for tp in assigned:
            part = parts.get((tp.topic, tp.partition))
            room, pollable = self.free_room(part.outstanding if part is not None else 0, len(assigned), with_work)
            if pollable:
                fetchable.append(tp)
                least_room = min(least_room, room)
        return fetchable, least_room, len(fetchable) < len(assigned)

    def pollable_again(self, part: PartitionTrack, parts: Mapping[tuple[str, int], PartitionTrack],
                       assigned: int) -> bool:
        """Whether a fetch loop that waits because every partition is at its cap should look again now that an
        event of ``part`` is done: ``part`` may be polled (the rule of :meth:`fetchable`), or it has nothing
        outstanding any more, which with ordering none enlarges the other partitions' shares. Waking it for
        every done event would cost a loop turn per event."""
        outstanding = part.outstanding
        if not outstanding:
            return True
        with_work = sum(1 for p in parts.values() if p.outstanding) if self._by_work else 0
        return self.free_room(outstanding, assigned, with_work)[1]
