"""Backfill's sort by event time: external merge sort, order independence, the late-events verdict."""

from __future__ import annotations

import os
import random

import orjson
import pytest
from typer.testing import CliRunner

from kpimon.agents.cli import pipeline as cli
from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import generate
from kpimon.streams.events import Decoder

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _records(n: int, seed: int) -> list[bf.SortRecord]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = START + rnd.randrange(1000)  # many equal ts: ties are broken by the line
        line = orjson.dumps({"n": rnd.randrange(50), "s": "a b  c\r\t"[: rnd.randrange(8)]})
        out.append((bf.UNDECODABLE, line) if i % 17 == 0 else (ts, line))
    return out


@pytest.mark.parametrize("memory, fan_in", [(200, 2), (1_000, 3), (5_000, 64), (10**9, 64)])
def test_external_sort_equals_sorted_and_cleans_up(tmp_path, memory, fan_in):
    records = _records(3_000, seed=memory)
    stats: dict[str, int] = {}
    got = list(bf.external_sort(iter(records), str(tmp_path), memory=memory, fan_in=fan_in, stats=stats))
    assert got == sorted(records)
    if memory < 10**9:
        assert stats["runs"] > fan_in  # really spilled, and merged in more than one level
    else:
        assert stats["runs"] == 0
    assert os.listdir(tmp_path) == []


def test_external_sort_removes_its_runs_when_closed_early(tmp_path):
    it = bf.external_sort(iter(_records(2_000, seed=1)), str(tmp_path), memory=500, fan_in=4)
    next(it)
    assert os.listdir(tmp_path)
    it.close()
    assert os.listdir(tmp_path) == []


def test_external_sort_refuses_a_line_with_a_newline(tmp_path):
    with pytest.raises(ValueError, match="newline"):
        list(bf.external_sort([(START, b'{"a":\n1}')], str(tmp_path)))


def test_sort_history_is_independent_of_the_input_order(tmp_path):
    lines = list(generate(3_000, start_ms=START, seed=5, users=200, bad_ratio=0.02, duplicate_ratio=0.02))
    # The same event_id twice with different content and the same ts: which one comes first
    # (and is kept by the dedup) must not depend on the file's order.
    twin = orjson.loads(next(line for line in lines if b'"purchase"' in line))
    twin["amount"] = "1.00"
    lines.append(orjson.dumps(twin))
    shuffled = lines[:]
    random.Random(3).shuffle(shuffled)
    outputs = []
    for i, order in enumerate((lines, shuffled, shuffled[::-1])):
        work = tmp_path / str(i)
        work.mkdir()
        history = bf.sort_history(iter(order), Decoder(), str(work), memory=20_000, fan_in=4)
        assert history.runs > 4
        outputs.append((list(history), history.count, history.bad, history.max_ts))
        assert os.listdir(work) == []
    assert outputs[0] == outputs[1] == outputs[2]
    ordered, count, bad, max_ts = outputs[0]
    assert count == len(lines) and sorted(ordered) == sorted(lines)
    dec = Decoder()
    decodable = [line for line in lines if _ts(dec, line) is not None]
    assert bad == len(lines) - len(decodable) > 0
    assert ordered[bad:] == sorted(decodable, key=lambda line: (_ts(dec, line), line))  # time order, ties by bytes
    assert max_ts == bf.scan_max_ts(lines)


def _ts(dec: Decoder, line: bytes) -> int | None:
    try:
        return dec.decode(line).ts
    except Exception:  # noqa: BLE001 - Rejected
        return None


def _report(late: int) -> dict:
    return {"events": {"accepted": 10, "rejected": 0, "duplicates": 0, "late": late}, "rejected_by_reason": {},
            "watermark": None, "periods": []}


def test_late_verdict():
    assert cli._late_verdict(_report(0), allow_late=False) == (None, 0)
    warning, code = cli._late_verdict(_report(7), allow_late=False)
    assert code == cli.LATE_EXIT == 3 and "refused 7 events as late" in warning
    assert cli._late_verdict(_report(7), allow_late=True) == (warning, 0)


@pytest.mark.parametrize("late, flags, code", [(0, [], 0), (5, [], 3), (5, ["--allow-late"], 0)])
def test_backfill_command_fails_loudly_on_late_events(tmp_path, monkeypatch, late, flags, code):
    history = tmp_path / "h.jsonl"
    history.write_text('{"event_id":"e1","user_id":"u1","type":"login","ts":1704067200000}\n')
    seen = {}

    def fake_run(path, settings, **kwargs):
        seen.update(kwargs)
        return _report(late)

    monkeypatch.setattr(bf, "run", fake_run)
    result = CliRunner().invoke(cli.app, ["backfill", str(history), "--sort-memory", "8", *flags],
                                env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == code, result.output
    assert seen["sort_memory"] == 8 * 2**20
    assert orjson.loads(result.stdout)["events"]["late"] == late  # the report is written either way
    if late:
        assert f"refused {late} events as late" in " ".join(result.stderr.split())
    else:
        assert "late" not in result.stderr
