"""Checkpoints in a real Kafka topic: chunked writes, torn and corrupted ones refused, fallback, deletion."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from kpimon.agents.core import checkpoint as codec
from kpimon.agents.core.dedup import DedupRule
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.worker import checkpoints
from kpimon.streams.events import Decoder
from tests.factories import DAY, settings_factory
from tests.pure_pipeline import engine_state

pytestmark = pytest.mark.integration

T0 = 1704067200000


def _engine(users: int) -> PartitionEngine:
    """An engine with ``users`` users, some still buffered: its checkpoint spans several chunks."""
    s = settings_factory()
    dec = Decoder(s.money.decimals)
    engine = PartitionEngine(EngineConfig.from_settings(s))
    engine.offer_batch([dec.decode(b'{"event_id":"e%d","user_id":"user-%08d-%s","type":"login","ts":%d}'
                                   % (i, i, b"x" * 40, T0 + (i * 30 // users) * DAY)) for i in range(users)])
    engine.advance(marker=T0 + 29 * DAY)
    return engine


def _state(engine: PartitionEngine) -> dict:
    """The engine's state but its dedup store, which lives on local disk, not in checkpoints."""
    return {k: v for k, v in engine_state(engine).items() if k != "dedup"}


@pytest.fixture
def topic(kafka):
    name = f"cp-test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    admin.create_topics([NewTopic(name, 2, 1)])
    admin.close()
    return name


async def _producer(kafka) -> AIOKafkaProducer:
    prod = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", max_request_size=2 * 2**20)
    await prod.start()
    return prod


async def test_write_read_fallback_and_delete(kafka, topic) -> None:
    engine = _engine(30_000)
    cfg = engine.cfg
    old = codec.take(engine, 1, 100)
    new_engine = _engine(30_000)
    new_engine.offer_batch([Decoder().decode(b'{"event_id":"z","user_id":"late","type":"login","ts":%d}'
                                             % (T0 + 29 * DAY + 5))])
    new = codec.take(new_engine, 1, 201)
    assert len(checkpoints.chunks_of(new)) >= 3  # really chunked
    prod = await _producer(kafka)
    try:
        c_old = await checkpoints.write(prod, topic, 1, old, 100)
        c_new = await checkpoints.write(prod, topic, 1, new, 200)
        # A torn write: the chunks of a third checkpoint, but the worker died before its commit.
        torn = codec.take(new_engine, 1, 301)
        for i, part in enumerate(checkpoints.chunks_of(torn)[:2]):
            await prod.send_and_wait(topic, part, partition=1, headers=[
                (checkpoints.H_DIGEST, codec.digest(torn).encode()), (checkpoints.H_PART, f"{i}/9".encode())])
    finally:
        await prod.stop()

    found = (await checkpoints.read(kafka.bootstrap, topic, [1]))[1]
    assert [c.position for c in found.commits] == [100, 200]
    cp, restored, commit = checkpoints.load_newest(found, cfg, 1, log_start=0)
    assert (commit.position, cp.source_offset, commit.digest) == (200, 201, c_new.digest)
    assert _state(restored) == _state(new_engine)

    # The newest one corrupted: a chunk's bytes changed -> refused, the previous one is loaded.
    chunk = found.chunks[c_new.digest]
    chunk[1] = bytes([chunk[1][0] ^ 1]) + chunk[1][1:]
    cp, restored, commit = checkpoints.load_newest(found, cfg, 1, log_start=0)
    assert commit.position == 100 and _state(restored) == _state(engine)
    # A chunk missing from the older one too: nothing intact is left, and that is said (None), not guessed.
    del found.chunks[c_old.digest][0]
    assert checkpoints.load_newest(found, cfg, 1, log_start=0) is None
    # A checkpoint the state log no longer reaches is skipped.
    found = (await checkpoints.read(kafka.bootstrap, topic, [1]))[1]
    assert checkpoints.load_newest(found, cfg, 1, log_start=150)[2].position == 200
    assert checkpoints.load_newest(found, cfg, 1, log_start=250) is None

    # Deleting up to the previous checkpoint keeps both loadable.
    cut = checkpoints.deletable(found.commits, DedupRule(0), T0 + 60 * DAY)  # every id forgotten
    assert cut == (100, c_old.first_offset)
    await checkpoints.delete_before(kafka.bootstrap, {(topic, 1): c_new.first_offset})
    after = (await checkpoints.read(kafka.bootstrap, topic, [1]))[1]
    assert [c.position for c in after.commits] == [200]
    assert checkpoints.load_newest(after, cfg, 1, log_start=0)[2].position == 200
