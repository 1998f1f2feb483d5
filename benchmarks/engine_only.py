"""Pure engine throughput: process_messages over pre-built records, no broker.

    python3 -m benchmarks.engine_only [N_EVENTS]

Prints events/s of the worker's per-partition batch path (decode, validate,
dedup, reorder, lifecycle, periods) without Kafka, to separate the engine's
cost from the transport's.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import orjson

from kpimon.agents.core.batch import process_messages
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.config.settings import load
from kpimon.streams.events import Decoder

DAY = 86_400_000


def synthetic(n: int, users: int = 100_000, start: int = 1_704_067_200_000, span_days: int = 120) -> list[bytes]:
    step = span_days * DAY // n
    types = ("page_view", "login", "purchase", "signup", "invite", "page_view", "app_open")
    out = []
    for i in range(n):
        t = types[i % len(types)]
        ev = {"event_id": f"e{i}", "user_id": f"user-{(i * 7919) % users}", "type": t, "ts": start + i * step}
        if t == "purchase":
            ev["amount"] = "19.99"
        out.append(orjson.dumps(ev))
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    lines = synthetic(n)
    msgs = [SimpleNamespace(offset=i, value=v, headers=(), key=None, topic="t") for i, v in enumerate(lines)]
    settings = load()
    engine = PartitionEngine(EngineConfig.from_settings(settings))
    dec = Decoder()
    t0 = time.perf_counter()
    batch = 4000
    pos = 0
    while pos < n:
        chunk = msgs[pos:pos + batch]
        p = 0
        while p < len(chunk):
            out, p = process_messages(engine, dec, chunk, p, chunk[p].offset, None, settings.channel_label)
        pos += batch
    engine.advance(marker=engine.max_ts)
    dt = time.perf_counter() - t0
    print(f"events={n} seconds={dt:.2f} events_per_s={n / dt:,.0f} users={engine.user_count()} "
          f"us_per_event={dt / n * 1e6:.2f}")


if __name__ == "__main__":
    main()
