"""A cluster leaves nothing behind whatever ends its process: SIGTERM tears it down at
once, and after SIGKILL the next cluster's start (cleanup_stale) removes what is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ioc_testbed.cluster import STATE_DIR, WORK_ROOT, cleanup_stale
from ioc_testbed.cluster.hoststate import hierarchies

from e2elib import REPO

# One node, started in its own process; prints what a teardown must remove.
STARTER = """
import json, os, sys, time
from pathlib import Path
from ioc_testbed.cluster import Cluster
cluster = Cluster(1, context=Path(sys.argv[1]), images=[])
cluster.start()
print(json.dumps({"id": cluster.run_id, "cgroup": cluster.cgroup.path,
                  "pids": cluster.pids()}), flush=True)
time.sleep(600)
"""


def start_cluster() -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen([sys.executable, "-c", STARTER, str(REPO)], text=True,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:  # bounded: the child starts or exits within its timeouts
        if line.startswith("{"):
            return proc, json.loads(line)
    raise AssertionError(f"the cluster did not start (exit {proc.wait(timeout=30)})")


def left_behind(info: dict) -> list[str]:
    run_id = info["id"]
    left = [p for p in (STATE_DIR / f"{run_id}.json", WORK_ROOT / run_id,
                        Path(f"/sys/class/net/itb-{run_id}"),
                        Path(f"/run/netns/itb-{run_id}-n0")) if p.exists()]
    left += [m / info["cgroup"].lstrip("/") for m in hierarchies()
             if (m / info["cgroup"].lstrip("/")).exists()]
    left += [Path(f"/proc/{pid}") for pid in info["pids"] if _alive(pid)]
    return [str(p) for p in left]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_sigterm_tears_the_cluster_down() -> None:
    proc, info = start_cluster()
    assert left_behind(info)  # it is up
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM
    assert left_behind(info) == []


def test_after_sigkill_the_next_start_cleans_up() -> None:
    proc, info = start_cluster()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert left_behind(info)
    assert info["id"] in cleanup_stale()
    assert left_behind(info) == []
