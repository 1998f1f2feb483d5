"""Static membership ids: one per worker slot on a host, stable across a SIGKILL, never shared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kpimon.agents.worker import instance
from kpimon.agents.worker.instance import InstanceTaken, claim
from tests.factories import settings_factory


def test_workers_on_one_host_get_distinct_slots_and_a_freed_slot_is_taken_again(tmp_path) -> None:
    a = claim(str(tmp_path), "app", host="node-1")
    b = claim(str(tmp_path), "app", host="node-1")
    assert (a.id, b.id) == ("node-1-0", "node-1-1")
    a.release()
    c = claim(str(tmp_path), "app", host="node-1")
    assert c.id == "node-1-0"  # the restarted worker is the same member again
    other = claim(str(tmp_path), "other-app", host="node-1")
    assert other.id == "node-1-0"  # slots are per deployment
    for i in (b, c, other):
        i.release()


def test_a_killed_process_frees_its_slot(tmp_path) -> None:
    code = ("import sys, time; from kpimon.agents.worker.instance import claim; "
            f"i = claim({str(tmp_path)!r}, 'app', host='h'); print(i.id, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "h-0"
        held = claim(str(tmp_path), "app", host="h")
        assert held.id == "h-1"  # slot 0 is the running process's
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        again = claim(str(tmp_path), "app", host="h")
        assert again.id == "h-0"
        held.release()
        again.release()
    finally:
        proc.kill()
        proc.wait()


def test_a_named_instance_is_refused_while_another_worker_holds_it(tmp_path) -> None:
    first = claim(str(tmp_path), "app", "worker-a")
    assert first.id == "worker-a"
    with pytest.raises(InstanceTaken, match="'worker-a' is held by another worker"):
        claim(str(tmp_path), "app", "worker-a")
    first.release()
    claim(str(tmp_path), "app", "worker-a").release()


def test_hostnames_become_valid_ids(tmp_path) -> None:
    got = claim(str(tmp_path), "app", host="my host/with:odd chars")
    assert got.id == "my_host_with_odd_chars-0"
    got.release()


def test_settings_choose_static_membership_or_not(tmp_path) -> None:
    on = instance.for_settings(settings_factory(worker={"state_dir": str(tmp_path)}))
    assert on is not None and on.id.endswith("-0")
    on.release()
    named = instance.for_settings(settings_factory(worker={"state_dir": str(tmp_path), "instance_id": "w7"}))
    assert named is not None and named.id == "w7"
    named.release()
    assert instance.for_settings(settings_factory(worker={"state_dir": str(tmp_path),
                                                           "static_membership": False})) is None


def test_only_the_ingest_group_is_static(tmp_path) -> None:
    """faust's assignor refuses a static rejoin's cached assignment made for another web address: its group
    stays dynamic, the ingest consumer (ours) is static."""
    from kpimon.agents.worker.app import create_app

    app = create_app(settings_factory(worker={"state_dir": str(tmp_path)}))
    assert app.kpimon_instance is not None and app.kpimon_instance.id.endswith("-0")
    assert app.kpimon_ingest.instance_id == app.kpimon_instance.id
    assert app.conf.consumer_group_instance_id is None
    app.kpimon_instance.release()
