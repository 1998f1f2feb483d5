"""Reading an internal topic's partitions from their first offset to their end: the state log and the checkpoints."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

# Each short-lived reader's assign() logs its topics at INFO (faust prints them as a table):
# recovery would fill the worker log with them.
logging.getLogger("aiokafka.consumer.subscription_state").setLevel(logging.WARNING)


async def read_to_end(bootstrap: str, topic: str, partitions: list[int],
                      offsets: dict[int, int] | None = None) -> AsyncGenerator[tuple[int, Any], None]:
    """Yield (partition, aiokafka ConsumerRecord) for every record of ``partitions``, in order per partition.

    ``offsets`` starts some partitions later than their first offset (where the
    log starts after deletions: :func:`log_starts`).
    Reads to the end offsets taken at the start, then whatever the consumer
    already holds: Tansu reports the start of a partition's last batch + 1 as
    its end, and once a record of that batch has come back the whole batch has
    been fetched.  It does not wait for an empty poll (a fetch that waits for
    data that will not come: ~0.2 s per read, twice per recovery), except when
    a partition is read from at or past its end offset: then only an empty
    poll tells whether records follow.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = [TopicPartition(topic, p) for p in partitions]
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                              auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                              fetch_max_bytes=64 * 1024 * 1024)
    await reader.start()
    try:
        # Offsets first: once partitions are assigned, these requests queue behind the fetcher's
        # long-polling fetch (fetch_max_wait_ms) and take half a second each.
        ends = await reader.end_offsets(tps)
        firsts = await reader.beginning_offsets(tps)
        if all(ends[tp] <= firsts[tp] for tp in tps):
            return  # all empty: nothing to wait for
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        for tp in tps:  # later than the log start where asked (never before it)
            if offsets and offsets.get(tp.partition, 0) > firsts[tp]:
                reader.seek(tp, offsets[tp.partition])
        # A read that starts at or past a partition's end offset learns nothing from that offset (on Tansu
        # there may be records after it): such reads end on an empty poll, as before.
        blind = any([await reader.position(tp) >= ends[tp] for tp in tps])
        reached = False
        while True:
            got = await reader.getmany(timeout_ms=0 if reached else 200, max_records=20000)
            for tp, msgs in got.items():
                for msg in msgs:
                    yield tp.partition, msg
            if reached and not got:
                break  # past the end offsets, and nothing more already fetched
            if not reached:
                positions = [await reader.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                    if not got:
                        break  # an empty poll past the end offsets
                    reached = not blind
    finally:
        await reader.stop()


async def log_starts(bootstrap: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """Each partition's first offset (above 0 once records before it were deleted)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        firsts = await reader.beginning_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: off for tp, off in firsts.items()}
    finally:
        await reader.stop()
