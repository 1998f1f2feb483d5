"""The serving layer in live mode: users applied on idle ticks reach Redis, and stay right across restarts.

In live mode (``clock: live``) the watermark is the wall clock minus
``lateness``.  Events dated "now" wait in the engine's reorder buffer and are
applied by a later clock-only tick record, once the stream is idle.  Every
user they change must reach Redis (issue: with a lateness longer than the
writer's 5 s probe interval, every such user was dropped as a "repeat").

The lateness here (7 s) is longer than that probe interval, so the empty
updates of the records that carried the events are written before the events
are applied, as in a deployment with the default 5 min lateness.
"""

from __future__ import annotations

import time
import urllib.request
import uuid

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kpimon.streams.events import Decoder
from tests.integration.conftest import Pipeline
from tests.integration.test_serving import at_risk_sets, redis_users, wait_for
from tests.serving_reference import STATES, expected_users

pytestmark = pytest.mark.integration

USERS = 60
LATENESS_S = 7


def scrape(p: Pipeline) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"{p.web_url}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def engine_population(p: Pipeline) -> dict[str, int]:
    m = scrape(p)
    return {state: int(m.get(("kpimon_lifecycle_users", (("state", state),)), 0)) for state in STATES}


def writes(p: Pipeline) -> dict[str, float]:
    m = scrape(p)
    return {r: m.get(("kpimon_serving_writes_total", (("result", r),)), 0.0)
            for r in ("applied", "repeat", "gap", "error")}


def wave(tag: str, now_ms: int, users: range, purchases: bool) -> list[bytes]:
    """Events dated now: a signup (first wave) and purchases and a refund, spread over the users."""
    out = []
    for i in users:
        uid = f"live{i:03d}"
        ts = now_ms + i
        if not purchases:
            out.append({"event_id": f"{tag}-{i}-s", "user_id": uid, "type": "signup", "ts": ts,
                        "channel": ("email", "social", "organic")[i % 3]})
            out.append({"event_id": f"{tag}-{i}-l", "user_id": uid, "type": "login", "ts": ts + 1})
        out.append({"event_id": f"{tag}-{i}-p", "user_id": uid, "type": "purchase", "ts": ts + 2,
                    "amount": f"{i + 1}.{i % 100:02d}"})
        if i % 4 == 0:
            out.append({"event_id": f"{tag}-{i}-r", "user_id": uid, "type": "refund", "ts": ts + 3, "amount": "0.50"})
        out.append({"event_id": f"{tag}-{i}-v", "user_id": uid, "type": "page_view", "ts": ts + 4})
    return [orjson.dumps(e) for e in out]


def reference(lines: list[bytes], p: Pipeline) -> dict[str, dict]:
    dec = Decoder(p.settings.money.decimals)
    events = []
    for line in lines:
        e = dec.decode(line)
        events.append({"user_id": e.user_id, "type": e.type, "ts": e.ts, "event_id": e.event_id,
                       "amount": e.amount, "channel": e.channel})
    wm = max(e["ts"] for e in events) + 1  # every event applied; minutes later, all are still active
    return expected_users(events, wm, p.settings.lifecycle.thresholds, p.settings.money.decimals)


def holds(client, prefix: str, expected: dict[str, dict], p: Pipeline) -> bool:
    """Redis holds exactly the expected users, each in the at-risk set of its state, like the engine."""
    got = redis_users(client, prefix)
    if got != expected:
        return False
    sets = at_risk_sets(client, prefix)
    want = {s: sorted((u["last_activity"], uid) for uid, u in expected.items() if u["state"] == s) for s in STATES}
    pop = engine_population(p)
    return sets == want and {s: len(v) for s, v in sets.items()} == pop


def test_users_applied_on_idle_ticks_reach_redis_and_survive_restarts(kafka, redis_server, tmp_path):
    server = redis_server
    if True:
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        p = Pipeline(kafka.bootstrap, str(tmp_path), lateness=f"{LATENESS_S}s",
                     worker={"clock": "live", "tick_interval": "500ms"},
                     redis={"enabled": True, "url": server.url, "key_prefix": prefix})
        client = server.client()
        try:
            p.start_worker()
            # The worker recovered its (empty) partitions and wrote their starting positions: from now on an
            # update without users is written within the writer's 5 s probe interval, before the events mature.
            wait_for(lambda: writes(p)["applied"] >= p.partitions, 60, "the serving layer's first writes", p)
            first = wave("a", int(time.time() * 1000), range(USERS), purchases=False)
            p.produce(first)  # then the stream stays idle: only the wall clock moves the watermark
            expected = reference(first, p)
            assert len(expected) == USERS
            wait_for(lambda: engine_population(p)["active"] == USERS, 60, "the engine to apply the events", p)
            wait_for(lambda: holds(client, prefix, expected, p), 30, "Redis to hold every user", p)
            w = writes(p)
            assert w["gap"] == w["error"] == 0, w

            # A crash, and Redis loses everything meanwhile: the restarted worker rebuilds it from the state log.
            p.kill(p.workers[-1])
            client.delete(*client.keys(f"{prefix}*"))
            p.start_worker()
            wait_for(lambda: holds(client, prefix, expected, p), 60, "the restarted worker to rebuild Redis", p)

            # More purchases for some users, again applied on idle ticks: lifetime revenue adds up exactly once.
            second = wave("b", int(time.time() * 1000), range(0, USERS, 3), purchases=True)
            p.produce(second)
            expected = reference(first + second, p)
            wait_for(lambda: holds(client, prefix, expected, p), 60, "Redis to reflect the second wave", p)
            w = writes(p)
            assert w["gap"] == w["error"] == 0, w  # the restarted worker's live path chains on
        finally:
            client.close()
            p.close()
