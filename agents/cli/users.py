"""The per-user commands on the serving layer in Redis: users at-risk, users get."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from kpimon.agents.cli.common import ConfigOpt, app, err, load_settings

T = TypeVar("T")


def with_redis(settings: Any, call: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``call(client)`` on one async Redis client; Redis unreachable is one line (RedisUnavailable)."""
    import asyncio

    from kpimon.agents.serving import redis_client

    async def run() -> T:
        client = redis_client.client(settings.redis.url, asyncio=True)
        try:
            return await call(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except redis_client.errors() as exc:
        raise redis_client.unavailable(settings.redis.url, exc) from None


users_app = typer.Typer(no_args_is_help=True, help="Per-user serving layer in Redis (lifecycle state, at-risk lists).")


@users_app.command("at-risk")
def users_at_risk(state: str = typer.Option(..., "--state", help="active, silent, sleeping, churned or dead."),
                  fmt: str = typer.Option("csv", "--format", help="csv or json."),
                  limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many users."),
                  config: Path | None = ConfigOpt) -> None:
    """Export the users in a lifecycle state for outreach, longest inactive first (reads Redis)."""
    from kpimon.agents.core.lifecycle import STATES
    from kpimon.agents.core.periods import Calendar
    from kpimon.agents.serving import read

    settings = load_settings(config)
    if state not in STATES or fmt not in ("csv", "json"):
        err.print(f"[red]--state must be one of {', '.join(STATES)}; --format csv or json[/red]")
        raise typer.Exit(2)

    n = with_redis(settings, lambda client: read.export_at_risk(
        client, settings.redis.key_prefix, state, fmt, Calendar(settings.timezone), sys.stdout.write, limit))
    err.print(f"{n} users in state {state}")


@users_app.command("get")
def users_get(user_id: str = typer.Argument(..., help="The user_id."), config: Path | None = ConfigOpt) -> None:
    """One user's serving state as JSON (reads Redis)."""
    from kpimon.agents.core.periods import Calendar
    from kpimon.agents.serving import read

    settings = load_settings(config)

    user = with_redis(settings, lambda client: read.get_user(client, settings.redis.key_prefix, user_id))
    if user is None:
        err.print(f"unknown user {user_id!r}")
        raise typer.Exit(1)
    sys.stdout.write(json.dumps(read.present(user, Calendar(settings.timezone)), indent=2) + "\n")


app.add_typer(users_app, name="users")
