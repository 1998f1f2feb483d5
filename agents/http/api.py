"""HTTP API of the worker over the serving layer (agents/serving/writer.py, read back by agents/serving/read.py).

* ``GET /api/users/{user_id}``: one user's lifecycle state, last activity,
  signup time and channel, lifetime revenue.
* ``GET /api/at-risk?state=sleeping&limit=100&offset=0``: the users in a state,
  longest inactive first (``limit`` 1..10000, default 100; ``format=json``, or
  ``format=csv`` for the same columns as ``kpimon users at-risk``).
* ``GET /api/snapshots/{grain}/{period}``: every version of a closed period's
  snapshot, oldest first (the ledger, docs/kpis.md).  Snapshots hold people's
  scores and bonus multipliers, so they are guarded like the per-user data.

All carry personal data, so all require ``Authorization: Bearer <token>``
with the token from the environment variable ``KPIMON_API_TOKEN`` (compared in
constant time).  Without the variable they answer 503 instead of serving
unauthenticated; a missing or wrong token gets 401.  Other answers: 400 for bad
parameters, 404 for an unknown user, 503 while Redis is unreachable or the
serving layer is disabled (``redis.enabled: false``).

The serving layer reflects the stream as of the watermark; while Redis was
down it can lag behind (``kpimon_serving_backlog_users`` > 0).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson

from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.core.periods import Calendar
from kpimon.agents.serving import read, redis_client

log = logging.getLogger("kpimon.api")

DEFAULT_LIMIT = 100


class ServingApi:
    """The endpoints' logic, framework-free: each method returns (status, body, content type, headers)."""

    def __init__(self, settings: Any, client: Any = None) -> None:
        self.settings = settings
        token = settings.api.token
        self._token = token.get_secret_value().encode() if token is not None else None
        self.prefix = settings.redis.key_prefix
        self.enabled = settings.redis.enabled
        self.calendar = Calendar(settings.timezone)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = redis_client.client(self.settings.redis.url, asyncio=True)
        return self._client

    def _deny(self, authorization: str | None) -> tuple[int, Any, str, dict] | None:
        if self._token is None:
            return 503, {"error": "KPIMON_API_TOKEN is not set: per-user endpoints are disabled"}, "json", {}
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            return 401, {"error": "a valid bearer token is required"}, "json", {"WWW-Authenticate": "Bearer"}
        if not self.enabled:
            return 503, {"error": "the serving layer is disabled (redis.enabled: false)"}, "json", {}
        return None

    async def user(self, authorization: str | None, user_id: str) -> tuple[int, Any, str, dict]:
        denied = self._deny(authorization)
        if denied is not None:
            return denied
        try:
            user = await read.get_user(self.client, self.prefix, user_id)
        except redis_client.errors() as err:
            return 503, {"error": f"serving layer unavailable: {type(err).__name__}"}, "json", {}
        if user is None:
            return 404, {"error": "unknown user"}, "json", {}
        return 200, read.present(user, self.calendar), "json", {}

    async def at_risk(self, authorization: str | None, query: Any) -> tuple[int, Any, str, dict]:
        denied = self._deny(authorization)
        if denied is not None:
            return denied
        state = query.get("state", "")
        fmt = query.get("format", "json")
        if state not in STATES:
            return 400, {"error": f"state must be one of {', '.join(STATES)}"}, "json", {}
        if fmt not in ("json", "csv"):
            return 400, {"error": "format must be json or csv"}, "json", {}
        try:
            limit = int(query.get("limit", DEFAULT_LIMIT))
            offset = int(query.get("offset", 0))
        except ValueError:
            return 400, {"error": "limit and offset must be integers"}, "json", {}
        if not 1 <= limit <= read.MAX_PAGE or offset < 0:
            return 400, {"error": f"limit must be 1..{read.MAX_PAGE} and offset >= 0"}, "json", {}
        try:
            users = await read.at_risk(self.client, self.prefix, state, limit, offset)
        except redis_client.errors() as err:
            return 503, {"error": f"serving layer unavailable: {type(err).__name__}"}, "json", {}
        if fmt == "csv":
            return 200, read.csv_rows(users, self.calendar), "csv", {}
        return 200, {"state": state, "offset": offset, "limit": limit,
                     "users": [read.present(u, self.calendar) for u in users]}, "json", {}


    async def snapshots(self, authorization: str | None, grain: str, period: str) -> tuple[int, Any, str, dict]:
        denied = self._deny(authorization)
        if denied is not None:
            return denied
        if grain not in ("day", "week", "month", "quarter", "year"):
            return 400, {"error": "grain must be day, week, month, quarter or year"}, "json", {}
        try:
            raw = await self.client.hgetall(f"{self.prefix}snapshot:{grain}:{period}")
        except redis_client.errors() as err:
            return 503, {"error": f"ledger store unavailable: {type(err).__name__}"}, "json", {}
        if not raw:
            return 404, {"error": f"no snapshot for {grain} {period}"}, "json", {}
        versions = [orjson.loads(raw[k]) for k in sorted(raw, key=lambda v: int(v))]
        return 200, {"grain": grain, "period": period, "versions": versions}, "json", {}


def register_api(app: Any, ingest: Any, settings: Any) -> ServingApi:
    """Add ``/api/users/{user_id}`` and ``/api/at-risk`` to a faust app (call before the app starts)."""
    api = ServingApi(settings)
    if api._token is None:
        log.warning("KPIMON_API_TOKEN is not set: /api/users and /api/at-risk answer 503")

    def reply(web: Any, status: int, body: Any, kind: str, headers: dict) -> Any:
        if kind == "csv":
            return web.text(body, content_type="text/csv", status=status, headers=headers or None)
        return web.json(body, status=status, headers=headers or None)

    @app.page("/api/users/{user_id}", name="kpimon_api_user")
    async def user_page(web, request, user_id):
        return reply(web, *(await api.user(request.headers.get("Authorization"), user_id)))

    @app.page("/api/at-risk", name="kpimon_api_at_risk")
    async def at_risk_page(web, request):
        return reply(web, *(await api.at_risk(request.headers.get("Authorization"), request.query)))

    @app.page("/api/snapshots/{grain}/{period}", name="kpimon_api_snapshots")
    async def snapshots_page(web, request, grain, period):
        return reply(web, *(await api.snapshots(request.headers.get("Authorization"), grain, period)))

    app.kpimon_api = api
    return api
