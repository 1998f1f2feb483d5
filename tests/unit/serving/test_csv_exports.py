"""CSV exports cannot be misread as formulas: agents/serving/csvsafe.py and every path that writes CSV
(``kpimon users at-risk``, ``/api/at-risk?format=csv``; the snapshot export is in test_cli.py)."""

from __future__ import annotations

import asyncio
import csv
import io

import pytest
from typer.testing import CliRunner

from kpimon.agents.cli import app
from kpimon.agents.core.periods import Calendar
from kpimon.agents.http.api import ServingApi
from kpimon.agents.serving import csvsafe, read
from kpimon.agents.serving import writer as serving
from kpimon.agents.serving.lua import RESET
from kpimon.agents.serving.writer import ServingWriter
from kpimon.config.settings import from_mapping
from tests.serving_support import START, make_settings, zone_of

HYPERLINK = '=HYPERLINK("http://x","y")'


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (HYPERLINK, "'" + HYPERLINK),
        ("+1+2", "'+1+2"),
        ("-1+2", "'-1+2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-", "'-"),
        ("-5.50", "-5.50"),      # a negative amount is a number, not a formula
        ("-0", "-0"),
        ("12", "12"),
        ("-1e3", "'-1e3"),       # only plain decimals are left alone
        ("-٣", "'-٣"),           # ... written with ASCII digits
        ("u1", "u1"),
        ("a=b", "a=b"),
        ("", ""),
        (None, ""),
        (-3, "-3"),
    ],
)
def test_cell(value, written):
    assert csvsafe.cell(value) == written


def test_every_cell_is_quoted_and_reads_back():
    buf = io.StringIO()
    csvsafe.writer(buf, lineterminator="\n").writerows([["id", "n"], ['a;=1+1', "-5.50"], ['say "hi"', None]])
    assert buf.getvalue() == '"id","n"\n"a;=1+1","-5.50"\n"say ""hi""",""\n'
    assert list(csv.reader(io.StringIO(buf.getvalue()))) == [["id", "n"], ["a;=1+1", "-5.50"], ['say "hi"', ""]]


async def _store(url: str, extra: dict | None = None):
    s = make_settings(url, **(extra or {}))
    w = ServingWriter(s)
    sleeping = zone_of(s, "sleeping")
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 1, {HYPERLINK: [START, sleeping, START, "email", -550],
                       "-1+2": [START + 1, sleeping, START, "@chan", 1999],
                       "plain": [START + 2, sleeping, None, None, 0]})
    assert await w.flush()
    await w.stop()
    return s


def _check(text: str) -> None:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(read.CSV_HEADER)
    assert [r[0] for r in rows[1:]] == ["'" + HYPERLINK, "'-1+2", "plain"]
    assert [r[5] for r in rows[1:]] == ["-5.50", "19.99", "0.00"]
    assert rows[2][4] == "'@chan"
    assert all(line.startswith('"') for line in text.splitlines())


async def test_at_risk_export_and_api_neutralise_formulas(redis_server):
    s = await _store(redis_server.url)
    client = serving.connect(redis_server.url)
    try:
        out = io.StringIO()
        n = await read.export_at_risk(client, s.redis.key_prefix, "sleeping", "csv", Calendar("UTC"), out.write)
        assert n == 3
        _check(out.getvalue())

        authed = from_mapping({"redis": {"url": redis_server.url, "key_prefix": s.redis.key_prefix}}, "<test>",
                              env={"KPIMON_API_TOKEN": "t0ken"})
        status, text, kind, _ = await ServingApi(authed, client).at_risk("Bearer t0ken",
                                                                         {"state": "sleeping", "format": "csv"})
        assert (status, kind) == (200, "csv")
        _check(text)
        assert text == out.getvalue()
    finally:
        await client.aclose()


def test_users_at_risk_command_neutralises_formulas(redis_server, tmp_path, monkeypatch):
    s = asyncio.run(_store(redis_server.url))
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text(f"redis: {{url: '{redis_server.url}', key_prefix: '{s.redis.key_prefix}'}}\n")
    monkeypatch.delenv("KPIMON_REDIS_URL", raising=False)
    result = CliRunner().invoke(app, ["users", "at-risk", "--state", "sleeping", "--config", str(cfg)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    _check(result.stdout)
