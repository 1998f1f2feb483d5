"""Reading an internal topic to its end (agents/worker/logread.py) on both brokers kpimon runs on, and the
agents' input cursors that read what faust did not deliver (agents/worker/inorder.py).

Recovery reads the checkpoints and the state log with ``read_to_end``: a
record it misses is state lost, so every record must come back, in order,
also on Tansu, whose end offset is the start of a partition's last batch + 1.
The records are produced in multi-record batches (a linger and no wait per
send), so the last batch of each partition holds several records.
"""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer

from kpimon.agents.worker.checkpoints import delete_before
from kpimon.agents.worker.inorder import Cursor, RecordsLost
from kpimon.agents.worker.logread import log_starts, read_to_end

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PARTITIONS = 3
PER_PARTITION = 700


async def _produce_batched(bootstrap: str, topic: str) -> dict[int, list[bytes]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=64 * 1024)
    await producer.start()
    sent: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    try:
        futures = []
        for i in range(PER_PARTITION):
            for p in range(PARTITIONS):
                value = f"{p}-{i}".encode()
                sent[p].append(value)
                futures.append(await producer.send(topic, value=value, partition=p))
        await producer.flush()
        for fut in futures:
            await fut
    finally:
        await producer.stop()
    return sent


async def _read(bootstrap: str, topic: str, offsets: dict[int, int] | None = None) -> dict[int, list]:
    got: dict[int, list] = {p: [] for p in range(PARTITIONS)}
    async for p, msg in read_to_end(bootstrap, topic, list(range(PARTITIONS)), offsets=offsets):
        got[p].append(msg)
    return got


@pytest.fixture(params=["kafka", "tansu"])
def broker(request):
    return request.getfixturevalue(request.param)


async def test_read_to_end_returns_every_record_in_order(broker) -> None:
    topic = f"logread-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, partitions=PARTITIONS)
    assert await _read(broker.bootstrap, topic) == {p: [] for p in range(PARTITIONS)}  # empty: returns at once

    sent = await _produce_batched(broker.bootstrap, topic)
    got = await _read(broker.bootstrap, topic)
    for p in range(PARTITIONS):
        assert [m.value for m in got[p]] == sent[p]
        assert [m.offset for m in got[p]] == list(range(PER_PARTITION))

    # from given offsets (recovery's read from the record before a checkpoint)
    later = await _read(broker.bootstrap, topic, offsets={0: PER_PARTITION - 1, 1: 100})
    assert [m.value for m in later[0]] == sent[0][-1:]
    assert [m.value for m in later[1]] == sent[1][100:]
    assert [m.value for m in later[2]] == sent[2]
    assert await log_starts(broker.bootstrap, topic, list(range(PARTITIONS))) == dict.fromkeys(range(PARTITIONS), 0)



async def _ten_records(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        for i in range(10):
            await producer.send(topic, value=f"r{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_cursor_reads_the_records_faust_did_not_deliver(broker) -> None:
    """agents/worker/inorder.py on a real broker: the records of a range, in order."""
    topic = f"cursor-{uuid.uuid4().hex[:10]}"
    broker.create_topic(topic, partitions=1)
    await _ten_records(broker.bootstrap, topic)
    cursor = Cursor({}, "test", topic, broker.bootstrap)
    assert await cursor.next() == 0  # no state yet: the topic's first offset
    assert [(o, v) async for o, v, _ in cursor.between(3, 7)] == [(o, f"r{o}".encode()) for o in range(3, 7)]
    cursor.set(7)
    assert await cursor.next() == 7 and cursor.refetched == 4


async def test_a_cursor_refuses_a_range_whose_records_were_deleted(kafka) -> None:
    """Rather than apply what is left: the numbers would not be exact."""
    topic = f"cursor-{uuid.uuid4().hex[:10]}"
    kafka.create_topic(topic, partitions=1)
    await _ten_records(kafka.bootstrap, topic)
    await delete_before(kafka.bootstrap, {(topic, 0): 5})
    with pytest.raises(RecordsLost, match="records 2 to 4 were deleted"):
        _ = [r async for r in Cursor({}, "test", topic, kafka.bootstrap).between(2, 8)]
    assert await Cursor({}, "test", topic, kafka.bootstrap).next() == 5
