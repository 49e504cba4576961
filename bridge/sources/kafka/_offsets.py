"""Offset bookkeeping of one assigned Kafka partition (no client library here: plain data, easy to reason about).

A partition's records pass three stages: *buffered* (fetched, not yet submitted), *in flight* (submitted, not
done) and *done*. Records are submitted in offset order, so the in-flight offsets form an ordered sequence in
which events may finish in any order. The committable position is the lowest offset that is not done: the
first in-flight offset not done, else the first buffered offset, else one past the last fetched record. It
only ever moves forward, so a commit never passes an event that is not done.

A :class:`PartitionTrack` lives for one assignment of its partition. When the partition is revoked the track is
retired (``current`` False): acknowledgements of its abandoned events change nothing any more, and a later
assignment of the same partition gets a fresh track that starts from the group's committed offset.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any


class PartitionTrack:
    """Buffered and in-flight records of one partition during one assignment."""

    __slots__ = ("_flight", "buffer", "committed", "current", "next_offset", "partition", "paused", "topic", "undone")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.buffer: deque[Any] = deque()  # fetched records (anything with an ``offset``), in offset order
        self._flight: OrderedDict[int, bool] = OrderedDict()  # submitted offset → done; leading done ones pruned
        self.undone = 0  # submitted and not done
        self.next_offset: int | None = None  # one past the last record fetched in this assignment
        self.committed: int | None = None  # the last position this track committed
        self.paused = False  # whether the consumer is told to pause fetching it
        self.current = True  # False once revoked (or shut down): acknowledgements are ignored from then on

    @property
    def key(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    @property
    def outstanding(self) -> int:
        """Records received and not done: buffered plus in flight."""
        return len(self.buffer) + self.undone

    def add_fetched(self, records: list[Any]) -> None:
        if records:
            self.buffer.extend(records)
            self.next_offset = records[-1].offset + 1

    def take(self) -> Any:
        """The next buffered record, now counted as in flight."""
        record = self.buffer.popleft()
        self._flight[record.offset] = False
        self.undone += 1
        return record

    def untake(self, record: Any) -> None:
        """Put back the record ``take`` returned last (its submit did not happen)."""
        if self._flight.get(record.offset) is False:
            del self._flight[record.offset]
            self.undone -= 1
        self.buffer.appendleft(record)

    def done(self, offset: int) -> None:
        if self._flight.get(offset) is not False:
            return  # unknown or already done: an acknowledgement is counted once
        self._flight[offset] = True
        self.undone -= 1
        while self._flight:
            first, finished = next(iter(self._flight.items()))
            if not finished:
                break
            del self._flight[first]

    def drop_buffer(self) -> int:
        """Forget buffered records (they will be fetched again from the committed position); returns how many."""
        dropped = len(self.buffer)
        if dropped:
            self.next_offset = self.buffer[0].offset
            self.buffer.clear()
        return dropped

    def position(self) -> int | None:
        """The committable position: the lowest offset not done (None before anything was fetched)."""
        if self._flight:
            return next(iter(self._flight))  # leading done entries are pruned, so the first one is not done
        if self.buffer:
            offset: int = self.buffer[0].offset
            return offset
        return self.next_offset

    def commit_due(self) -> int | None:
        """The position to commit when it moved since the last commit, else None."""
        position = self.position()
        if position is None or position == self.committed:
            return None
        return position
