"""How a kafka source comes by its partitions.

Live, the source is a member of its consumer group: it subscribes and the group coordinator hands partitions out
and takes them back (:class:`GroupListener` passes those changes on). A dry run must not be a member: joining
would rebalance partitions away from the live bridges, and whatever the dry run then printed would be gone for
them. So :class:`DryRunAssignment` assigns the consumer every partition of the source's topics by hand, which
never joins the group; the consumer still reads the group's committed offsets and starts each partition there
(``start_from`` where the group has none), and the source never commits. Topics and their partition counts come
from the cluster's metadata, read again every ``metadata_max_age_ms`` (client option; 30 s by default), so a
topic created later (by name, or matching ``topic_pattern``) is read once it is there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bridge.sources.kafka._conn import shared_options
from bridge.sources.kafka._offsets import PartitionTrack
from bridge.sources.kafka.spec import KafkaSourceConfig

log = logging.getLogger("bridge.sources.kafka")

_DISCOVER_INTERVAL_S = 30.0  # dry run: how often topics and partitions are looked up again, by default
_MIN_DISCOVER_INTERVAL_S = 0.1  # ... and at most this often, whatever metadata_max_age_ms says

OnRevoked = Callable[[set[Any]], Awaitable[None]]
OnAssigned = Callable[[set[Any]], None]


class GroupListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information
    """Passes the group's revocations and assignments on to the source."""

    def __init__(self, on_revoked: OnRevoked, on_assigned: OnAssigned) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        self._on_assigned(assigned)


def topics_text(kc: KafkaSourceConfig) -> str:
    """What the source reads, for log lines."""
    if kc.topic_pattern is not None:
        return f"topics matching {kc.topic_pattern!r}"
    return "topic(s) " + ", ".join(kc.topics)


def subscribe(consumer: Any, kc: KafkaSourceConfig, listener: GroupListener) -> None:
    """Join the group for the source's topics (the join itself happens in the background)."""
    if kc.topic_pattern is not None:
        consumer.subscribe(pattern=kc.topic_pattern, listener=listener)
    else:
        consumer.subscribe(topics=list(kc.topics), listener=listener)


class DryRunAssignment:
    """Keeps the consumer assigned to every partition of the source's topics, without a group membership.

    ``parts`` are the source's partition tracks. A new manual assignment resets every position to the committed
    offset (and resumes every partition), and a dry run commits nothing, so a partition kept across a change of
    assignment is moved back to one past the last record the source received of it, and paused again if it was.
    """

    def __init__(
        self,
        consumer: Any,
        source_id: str,
        kc: KafkaSourceConfig,
        parts: Mapping[tuple[str, int], PartitionTrack],
        *,
        on_revoked: OnRevoked,
        on_assigned: OnAssigned,
    ) -> None:
        self._consumer = consumer
        self._source_id = source_id
        self._kc = kc
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned
        self._parts = parts
        self._pattern = re.compile(kc.topic_pattern) if kc.topic_pattern is not None else None
        max_age_ms = kc.client_options.get("metadata_max_age_ms")
        interval_s = max_age_ms / 1000 if isinstance(max_age_ms, int | float) else _DISCOVER_INTERVAL_S
        self._interval_s = max(_MIN_DISCOVER_INTERVAL_S, interval_s)
        self._admin: Any = None
        self._missing: set[str] = set()

    async def start(self) -> None:
        """Assign every partition there is now."""
        self._admin = AIOKafkaAdminClient(**shared_options(self._kc))
        await self._admin.start()
        await self._refresh()
        if self._pattern is not None and not self._consumer.assignment():
            log.info("kafka source %s: dry run: no topic matches %r (yet); looked up again every %.0f s",
                     self._source_id, self._kc.topic_pattern, self._interval_s)

    async def run(self) -> None:
        """Follow topics and partitions as they come and go, until cancelled. A failed lookup only delays the
        next one: the partitions already assigned are read on meanwhile."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._refresh()
            except KafkaError as exc:
                log.warning("kafka source %s: dry run: looking up topics failed: %r; trying again in %.0f s",
                            self._source_id, exc, self._interval_s)

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()

    async def _refresh(self) -> None:
        wanted = await self._discover()
        current: set[Any] = set(self._consumer.assignment())
        if wanted == current:
            return
        kept, gone, added = wanted & current, current - wanted, wanted - current
        # Nothing awaits from here to the seeks: no record can reach a track in between.
        self._consumer.assign(list(wanted))
        held = []
        for tp in kept:
            part = self._parts.get((tp.topic, tp.partition))
            if part is not None and part.next_offset is not None:
                self._consumer.seek(tp, part.next_offset)
            if part is not None and part.paused:
                held.append(tp)
        if held:
            self._consumer.pause(*held)
        if gone:
            await self._on_revoked(gone)
        if added:
            self._on_assigned(added)

    async def _discover(self) -> set[Any]:
        # Every topic's metadata, filtered here: asking for the configured topics by name could make a broker
        # with automatic topic creation create them, and a dry run creates nothing.
        wanted: set[Any] = set()
        found: set[str] = set()
        for topic in await self._admin.describe_topics(None):
            name = topic.get("topic", topic.get("name"))
            if topic.get("error_code") or topic.get("is_internal") or not isinstance(name, str):
                continue
            if self._pattern.match(name) if self._pattern is not None else name in self._kc.topics:
                found.add(name)
                wanted.update(TopicPartition(name, p["partition"]) for p in topic.get("partitions", ()))
        missing = set(self._kc.topics) - found
        if missing - self._missing:
            log.warning("kafka source %s: dry run: topic(s) %s do not exist (yet); looked up again every %.0f s",
                        self._source_id, ", ".join(sorted(missing - self._missing)), self._interval_s)
        self._missing = missing
        return wanted

